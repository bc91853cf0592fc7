"""The collector loop: drain a mailbox into the journal, settle what is safe, wait for more; reconnect on trouble.

Order of events for each message, which is what makes the collector loss-free where mail_room is not:
claim it (when several collectors share the mailbox), fetch it without marking it read, commit it to the
journal (fsynced), mark the claim done, and only then mark it read or delete it on the server. A crash at any
point leaves the message either unread on the server or in the journal, and a message found both ways is
recognised by the journal's fingerprint and only settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtp_gateway.collectors import Ref, Source
from lmtp_gateway.collectors.arbiter import Arbiter, Claim, RedisArbiter, SoleCollector, owner_id
from lmtp_gateway.collectors.graph import ClientCredentials, GraphSettings, GraphSource
from lmtp_gateway.collectors.imap import ImapSettings, ImapSource
from lmtp_gateway.config import Config, MailboxConfig
from lmtp_gateway.errors import ConfigError, JournalError, SourceError
from lmtp_gateway.intake import Intake
from lmtp_gateway.metrics import Metrics
from lmtp_gateway.sinks import Sinks

log = logging.getLogger(__name__)

BATCH_MESSAGES = 50
BATCH_BYTES = 32 * 1024 * 1024
BACKOFF_START = 1.0
BACKOFF_CAP = 300.0
IMAP_XOAUTH2_SCOPE = "https://outlook.office365.com/.default"  # Exchange Online's IMAP resource


def is_collected(mailbox: MailboxConfig) -> bool:
    """A mailbox the gateway collects from, rather than one Postfix delivers to over LMTP."""
    settings = mailbox.settings
    return settings.get("inbox_method") == "microsoft_graph" or bool(settings.get("host") and settings.get("user"))


@dataclass
class CollectorStatus:
    """What a collector reports (logs, `--once` summary, metrics)."""

    state: str = "connecting"  # connecting | idle | fetching | backoff | stopped
    collected: int = 0
    last_error: str | None = None
    skipped: set[str] = field(default_factory=set)  # too large: left in the mailbox, reported once


class MailboxCollector:
    def __init__(
        self,
        mailbox: str,
        source: Source,
        intake: Intake,
        arbiter: Arbiter,
        *,
        max_message_size: int,
        wait_seconds: float = 60.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.mailbox = mailbox
        self.source = source
        self.intake = intake
        self.arbiter = arbiter
        self.max_message_size = max_message_size
        self.wait_seconds = wait_seconds
        self.status = CollectorStatus()
        self.metrics = metrics
        self.ingress = f"{source.name.split(':', 1)[0]}:{mailbox}"
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    def _set_state(self, state: str) -> None:
        self.status.state = state
        if self.metrics is not None:
            self.metrics.set_collector_state(self.mailbox, state)

    # --- one pass ---

    async def drain(self) -> int:
        """Take everything waiting now; the number of messages committed."""
        taken = 0
        handled: set[str] = set()  # settled in this pass: if the server shows them again, do not loop on them
        while not self._stopping.is_set():
            refs = await self.source.pending(BATCH_MESSAGES, self.status.skipped | handled)
            if not refs:
                break
            self._set_state("fetching")
            progress = 0
            for batch in _by_size([ref for ref in refs if not self._too_large(ref, ref.size)]):
                committed, settled = await self._take(batch)
                taken += len(committed)
                progress += len(settled)
                handled.update(ref.key for ref in settled)
            if not progress:
                break  # only messages other collectors hold, or too large ones, are left
        return taken

    def _too_large(self, ref: Ref, size: int | None) -> bool:
        if size is None or size <= self.max_message_size:
            return False
        self.status.skipped.add(ref.key)
        log.error(
            "%s: message %s is %d bytes, over the %d-byte limit: left in the mailbox",
            self.source.name,
            ref.handle,
            size,
            self.max_message_size,
            extra={"event": "collector_too_large", "mailbox": self.mailbox},
        )
        return True

    async def _take(self, refs: list[Ref]) -> tuple[list[Ref], list[Ref]]:
        """Claim, fetch, commit, settle one batch: (messages committed, messages settled)."""
        claims = await self.arbiter.claim([ref.key for ref in refs])
        mine = [ref for ref, claim in zip(refs, claims, strict=True) if claim is Claim.MINE]
        done_elsewhere = [ref for ref, claim in zip(refs, claims, strict=True) if claim is Claim.DONE]
        raws = await self.source.fetch(mine)
        fetched = [ref for ref in mine if ref.handle in raws and not self._too_large(ref, len(raws[ref.handle]))]
        left = [ref for ref in mine if ref not in fetched]  # vanished meanwhile, or too large
        results = await asyncio.gather(
            *(self._commit(raws.pop(ref.handle)) for ref in fetched), return_exceptions=True
        )  # concurrently, so the journal's group flush covers them together
        committed = [ref for ref, result in zip(fetched, results, strict=True) if isinstance(result, bool)]
        left += [ref for ref, result in zip(fetched, results, strict=True) if not isinstance(result, bool)]
        new = sum(1 for result in results if result is True)
        await self.arbiter.finish([ref.key for ref in committed])
        await self.source.settle(committed + done_elsewhere)
        await self.arbiter.release([ref.key for ref in left])
        self.status.collected += new
        if self.metrics is not None and new:
            self.metrics.count_collected(self.mailbox, new)
        if committed:
            log.info(
                "%s: collected %d message(s), %d already in the journal",
                self.source.name,
                new,
                len(committed) - new,
                extra={"event": "collected", "mailbox": self.mailbox, "ingress": self.ingress},
            )
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            raise errors[0]
        return committed, committed + done_elsewhere

    async def _commit(self, raw: bytes) -> bool:
        """Into the journal; False when it was there already (fetched again after a crash or a lost flag)."""
        (acceptance,) = await self.intake.accept(
            Intake.received(raw), None, [None], ingress=self.ingress, mailbox=self.mailbox, keep_rejected=True
        )
        return not acceptance.duplicate

    # --- supervision ---

    async def once(self) -> int:
        try:
            self._set_state("connecting")
            await self.source.connect()
            return await self.drain()
        finally:
            await self.source.close()
            self._set_state("stopped")

    async def run(self) -> None:
        """Collect until stopped; every failure is reported and retried with backoff, never raised."""
        delay = BACKOFF_START
        while not self._stopping.is_set():
            try:
                self._set_state("connecting")
                await self.source.connect()
                log.info(
                    "%s: connected", self.source.name, extra={"event": "collector_connected", "mailbox": self.mailbox}
                )
                while not self._stopping.is_set():
                    await self.drain()
                    self.status.last_error = None
                    delay = BACKOFF_START
                    self._set_state("idle")
                    await _until_stopped(self.source.wait(self.wait_seconds), self._stopping)
            except Exception as error:  # a collector never dies: it reports and retries
                self.status.last_error = describe(error)
                self._set_state("backoff")
                log.warning(
                    "%s: %s; trying again in %.0fs",
                    self.source.name,
                    self.status.last_error,
                    delay,
                    extra={"event": "collector_error", "mailbox": self.mailbox},
                )
                await self.source.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, BACKOFF_CAP)
            else:
                await self.source.close()
        self._set_state("stopped")


def describe(error: BaseException) -> str:
    """One line for the operator: what failed, without a traceback for the expected kinds."""
    if isinstance(error, SourceError | JournalError):
        return str(error)
    if isinstance(error, OSError | TimeoutError):
        return f"network: {error or type(error).__name__}"
    name = type(error).__name__
    if type(error).__module__.startswith("redis"):
        return f"Redis (arbitration): {error}"
    if type(error).__module__.startswith("aioimaplib"):
        return f"IMAP: {error}"
    log.error("collector: unexpected %s", name, exc_info=error)
    return f"unexpected {name}: {error}"


async def _until_stopped(work: Coroutine[Any, Any, None], stopping: asyncio.Event) -> None:
    """Run `work` until it ends or `stopping` is set; its exception, if any, is raised."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.done() and not task.cancelled() and (error := task.exception()) is not None:
        raise error


def _by_size(refs: list[Ref]) -> list[list[Ref]]:
    """Batches of at most BATCH_BYTES (as the server reports sizes), so a backlog never floods memory."""
    batches: list[list[Ref]] = []
    current: list[Ref] = []
    size = 0
    for ref in refs:
        if current and size + (ref.size or 0) > BATCH_BYTES:
            batches.append(current)
            current, size = [], 0
        current.append(ref)
        size += ref.size or 0
    if current:
        batches.append(current)
    return batches


# --- building them from the configuration ---


def collected_mailboxes(config: Config, only: str | None = None) -> list[MailboxConfig]:
    chosen = [m for m in config.mailboxes.values() if is_collected(m) and (only is None or m.name == only)]
    if only is not None and only not in config.mailboxes:
        raise ConfigError(f"{config.source}: --mailbox {only}: not configured (have {', '.join(config.mailboxes)})")
    if not chosen:
        raise ConfigError(
            f"{config.source}: no mailbox to collect from: give {only or 'incoming_email'}.host, .user and "
            ".password (IMAP), or inbox_method: microsoft_graph with inbox_options"
        )
    return chosen


def build_source(config: Config, mailbox: MailboxConfig, state_dir: Path) -> Source:
    where = f"{config.source}: {mailbox.name}"
    settings = mailbox.settings
    try:
        if settings.get("inbox_method") == "microsoft_graph":
            return GraphSource(GraphSettings.from_config(settings, where))
        imap = ImapSettings.from_config(settings, where)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    token = None
    options = settings.get("inbox_options") or {}
    if options.get("client_id"):  # Exchange Online without basic auth: XOAUTH2 with an app token
        try:
            graph = GraphSettings.from_config({**settings, "user": imap.user}, where)
        except ValueError as error:
            raise ConfigError(f"{error} (XOAUTH2 for IMAP)") from None
        token = ClientCredentials(
            None,
            graph.azure_ad_endpoint,
            graph.tenant_id,
            graph.client_id,
            graph.client_secret,
            options.get("scope") or IMAP_XOAUTH2_SCOPE,
        )
    elif not imap.password:
        raise ConfigError(f"{where}.password: missing (needed to log in to {imap.host})")
    state_path = state_dir / f"{re.sub(r'[^A-Za-z0-9@._-]+', '_', imap.identity)}.json"
    return ImapSource(imap, state_path, token=token)


def build_collectors(
    config: Config,
    intake: Intake,
    sinks: Sinks,
    state_dir: Path,
    only: str | None = None,
    metrics: Metrics | None = None,
) -> list[MailboxCollector]:
    arbiter: Arbiter
    if sinks.redis is not None:
        arbiter = RedisArbiter(sinks.redis, owner_id(state_dir), done_seconds=config.spool.retention)
    else:
        arbiter = SoleCollector()
    collectors = []
    for mailbox in collected_mailboxes(config, only):
        source = build_source(config, mailbox, state_dir)
        wait = float(mailbox.settings.get("idle_timeout") or 60)
        collectors.append(
            MailboxCollector(
                mailbox.name,
                source,
                intake,
                arbiter,
                max_message_size=config.lmtp.max_message_size,
                wait_seconds=wait,
                metrics=metrics,
            )
        )
    return collectors
