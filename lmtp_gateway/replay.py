"""Replay: deliver journal entries again, or feed .eml files through the same rules and journal.

For the day GitLab lost jobs (Redis flushed, a restore from backup) or an admin fixed the cause of a dead letter.
Entries already delivered are pushed again on purpose (the Redis dedupe key is overwritten); pending and failed
entries go through the normal dedupe, so a replay racing the running daemon cannot double them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lmtp_gateway.config import Config, parse_duration
from lmtp_gateway.dispatch import Dispatcher
from lmtp_gateway.errors import JournalError
from lmtp_gateway.intake import Intake
from lmtp_gateway.journal import DamagedEntry, Entry, Journal, State, recovery
from lmtp_gateway.rules import RoutingTable, route
from lmtp_gateway.sinks import Delivered, Permanent, Sinks, Transient, build_sinks
from lmtp_gateway.spool import Selection, Spool, select, set_aside

log = logging.getLogger(__name__)


def parse_time(text: str, now: float | None = None) -> float:
    """An absolute ISO 8601 time, or a duration ago (``2h``, ``7d``)."""
    if re.fullmatch(r"\s*\d+\s*[smhdw]?\s*", text):
        return (now if now is not None else time.time()) - parse_duration(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO time (2026-11-22T10:00) nor a duration ago (2h, 7d)") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.timestamp()


@dataclass
class ReplayLine:
    what: str  # journal id or file name
    action: str  # delivered, failed, deferred, skipped, queued, rejected, dropped, would …
    detail: str = ""


async def replay_entries(
    spool: Spool, sinks: Sinks, entries: Iterable[Entry], *, dry_run: bool, progress: Callable[[], None]
) -> list[ReplayLine]:
    lines = []
    for entry in entries:
        lines.append(await _replay_entry(spool.journal_of(entry), sinks, entry, dry_run))
        progress()
    return lines


def take_over_unowned(spool: Spool) -> list[ReplayLine]:
    """A journal nobody owns (its host never came back, its `serve` is stopped) never had the start-up repair a
    `serve` gives its own: give it now, so that what a crash cut short is put right, or set aside and said, rather
    than skipped in silence. A journal a running process owns was repaired by it and is left alone."""
    lines = []
    for journal in spool.journals:
        before = set(journal.quarantined())
        try:
            journal.open()
        except JournalError:
            continue
        for entry_id in sorted(set(journal.quarantined()) - before):
            _, problem = journal.diagnose(entry_id)
            lines.append(ReplayLine(entry_id, "damaged", f"{problem}: set aside in {journal.quarantine}"))
    return lines


async def _replay_entry(journal: Journal, sinks: Sinks, entry: Entry, dry_run: bool) -> ReplayLine:
    if entry.state is State.DROPPED or entry.mailbox is None:
        return ReplayLine(entry.id, "skipped", "auto-generated: GitLab would drop it")
    if entry.mailbox not in sinks.by_mailbox:
        return ReplayLine(entry.id, "skipped", f"mailbox {entry.mailbox} is not configured")
    sink = sinks[entry.mailbox]
    force = entry.state is State.DELIVERED
    if dry_run:
        again = " again" if force else ""
        return ReplayLine(entry.id, "would deliver", f"{entry.mailbox} via {sink.name}{again} (now {entry.state})")
    try:
        raw = await asyncio.to_thread(_read_message, journal, entry)
    except (DamagedEntry, FileNotFoundError) as damage:
        problem = str(damage) if isinstance(damage, DamagedEntry) else "message file missing"
        await asyncio.to_thread(journal.set_aside, entry.id, entry.state, problem)
        return ReplayLine(entry.id, "damaged", f"{problem}: set aside in {journal.quarantine}")
    outcome = await sink.deliver(entry, raw, force=force)
    entry.attempts += 1
    entry.sink = sink.name
    entry.extra["replayed_at"] = time.time()
    match outcome:
        case Delivered(detail):
            entry.last_error = None
            await journal.move(entry, State.DELIVERED)
            return ReplayLine(entry.id, "delivered", detail)
        case Permanent(reason):
            entry.last_error = reason
            await journal.move(entry, State.FAILED, durable=True)
            return ReplayLine(entry.id, "failed", reason)
        case Transient(reason):
            entry.last_error = reason
            await journal.update(entry)
            return ReplayLine(entry.id, "deferred", reason)
    raise AssertionError(outcome)


def _read_message(journal: Journal, entry: Entry) -> bytes:
    """The entry's message; first put back where it belongs if a crash cut a state change short. A state change
    renames the .json first, so its .eml may still be in the directory of the state it came from. `serve` puts
    that right at start-up; a journal carried from a host that never came back never had that start-up."""
    try:
        return journal.read_message(entry)
    except FileNotFoundError:
        left = next((path for path in _elsewhere(journal, entry) if path.exists()), None)
        if left is None:
            raise
        recovery.rejoin(journal, left, entry.state)
        return journal.read_message(entry)


def _elsewhere(journal: Journal, entry: Entry) -> list[Path]:
    return [journal.state_dir(state) / f"{entry.id}.eml" for state in State if state is not entry.state]


async def ingest_files(
    intake: Intake,
    table: RoutingTable,
    paths: Iterable[Path],
    *,
    rcpt: str | None,
    mail_from: str | None,
    dry_run: bool,
    progress: Callable[[], None],
) -> list[ReplayLine]:
    lines = []
    for path in paths:
        raw = path.read_bytes()
        if dry_run:
            verdict = route(table, raw, rcpt=rcpt)
            detail = f"{verdict.mailbox} {verdict.handler} key={verdict.key}" if verdict.key else verdict.reason
            lines.append(ReplayLine(str(path), f"would {verdict.verdict}", detail))
        else:
            lines.append(await _ingest_one(intake, path, raw, rcpt, mail_from))
        progress()
    return lines


async def _ingest_one(intake: Intake, path: Path, raw: bytes, rcpt: str | None, mail_from: str | None) -> ReplayLine:
    try:
        received = intake.received(raw)
        (acceptance,) = await intake.accept(received, mail_from, [rcpt], ingress="replay")
    except JournalError as error:
        return ReplayLine(str(path), "deferred", str(error))
    if acceptance.entry is None:
        return ReplayLine(str(path), "rejected", acceptance.verdict.reason)
    if acceptance.duplicate:
        return ReplayLine(str(path), "duplicate", f"already in the journal as {acceptance.entry.id}")
    action = "queued" if acceptance.entry.state is State.PENDING else "dropped"
    return ReplayLine(str(path), action, acceptance.entry.id)


async def restore_set_aside(spool: Spool, sinks: Sinks, ids: tuple[str, ...], *, dry_run: bool) -> list[ReplayLine]:
    """Entries set aside in quarantine/ that an admin repaired: each whole one back to pending and delivered;
    each still damaged one reported with what is wrong."""
    lines = []
    for found in set_aside(spool, ids):
        journal, where = found.journal, found.where
        if found.entry is None or found.problem is not None:
            fix = f"repair {where}.json and .eml, or feed {where}.eml in with --rcpt"
            lines.append(ReplayLine(found.id, "damaged", f"{found.problem}: {fix}"))
            continue
        if dry_run:
            lines.append(ReplayLine(found.id, "would restore", f"whole again; back to pending ({found.entry.mailbox})"))
            continue
        entry = await journal.restore(found.id)
        lines.append(await _replay_entry(journal, sinks, entry, dry_run=False))
    return lines


def summary(lines: list[ReplayLine]) -> str:
    if not lines:
        return "nothing selected: no entry or file matched"
    counts = Counter(line.action for line in lines)
    return f"{len(lines)} processed: " + ", ".join(f"{count} {action}" for action, count in sorted(counts.items()))


Progress = Callable[[int, str], AbstractContextManager[Callable[[], None]]]


async def run(
    config: Config,
    *,
    selection: Selection | None,
    files: Iterable[Path],
    quarantined: bool = False,
    rcpt: str | None,
    mail_from: str | None,
    dry_run: bool,
    progress: Progress,
) -> list[ReplayLine]:
    """What `lmtp-gateway replay` does: entries chosen by `selection`, or else `files` as new mail."""
    sinks = build_sinks(config)
    spool = Spool(config.spool.path, sync=config.spool.sync)
    journal = spool.journals[0]  # new mail fed in goes to worker 0's shard, as if it had arrived there
    try:
        if quarantined:
            return await restore_set_aside(spool, sinks, selection.ids if selection else (), dry_run=dry_run)
        if selection is not None:
            repaired = [] if dry_run else take_over_unowned(spool)
            entries = select(spool, selection)
            with progress(len(entries), "replaying") as step:
                return repaired + await replay_entries(spool, sinks, entries, dry_run=dry_run, progress=step)
        files = list(files)
        journal.ensure_layout()
        dispatcher = Dispatcher(journal, sinks, refill=False)  # what it ingests, not what `serve` owns
        intake = Intake(
            config.routing,
            journal,
            None if dry_run else dispatcher,
            siblings=spool.journals[1:],
            retry_horizon=config.spool.retention,
        )
        with progress(len(files), "ingesting") as step:
            lines = await ingest_files(
                intake, config.routing, files, rcpt=rcpt, mail_from=mail_from, dry_run=dry_run, progress=step
            )
        if not dry_run:
            await _deliver_now(dispatcher, lines)
        return lines
    finally:
        await sinks.close()
        spool.close()


async def _deliver_now(dispatcher: Dispatcher, lines: list[ReplayLine]) -> None:
    """Run the dispatcher until every newly queued entry had its first attempt; what fails temporarily waits in
    deferred/, where a running `serve` retries it."""
    runner = asyncio.create_task(dispatcher.run())
    try:
        await asyncio.wait_for(dispatcher.flush(), 60)
    except TimeoutError:
        pass
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await runner
    for line in lines:
        if line.action != "queued":
            continue
        entry = dispatcher.journal.find(line.detail)
        if entry is None:
            continue
        if entry.state in (State.DELIVERED, State.FAILED):
            line.action = entry.state.value
            if entry.state is State.FAILED:
                line.detail += f" ({entry.last_error})"
        else:
            line.action = "deferred"
            waiting = "retried by serve" if entry.state is State.DEFERRED else "stays pending"
            line.detail += f" ({waiting}: {entry.last_error or 'not attempted'})"
