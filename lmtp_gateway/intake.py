"""Intake: GitLab's verdict on each copy of a received message, one job per GitLab target, the journal, the hand-on.

Every way in (LMTP, replay, the collectors) ends here, so the rules, the dedupe and the journal are applied the
same way whatever the source. What comes back is one ``Acceptance`` per recipient, in order, for the caller to
turn into its own answer (an LMTP reply, an IMAP flag, a line of ``replay`` output).

Each copy's verdict is GitLab's reading of that copy (``rules.copy_verdict``). Copies that GitLab would route
the same way (same mailbox and key), within one transaction or across several, make one entry to deliver: the
first; the others are journaled as dropped, naming it. GitLab, given both, would act twice on one target.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lmtp_gateway.config import DEFAULT_RETENTION
from lmtp_gateway.dispatch import Dispatcher
from lmtp_gateway.eightbit import for_gitlab, is_utf8
from lmtp_gateway.headers import Header, header_start, read_header
from lmtp_gateway.journal import ID_LENGTH, Draft, Entry, Journal, State, envelope_headers, fingerprint
from lmtp_gateway.journal.store import DEDUPE_STATES
from lmtp_gateway.metrics import Metrics
from lmtp_gateway.rules import REASON_BLANK, RoutingTable, Verdict, copy_verdict, gitlab_verdict, match_recipient, route

log = logging.getLogger(__name__)

HEAD_LIMIT = 1 << 20  # the rules read headers only; keep at most this much of a message for them
ROUTE_INLINE_LIMIT = 64 * 1024  # a header larger than this is read in a thread: the event loop serves others meanwhile


@dataclass(frozen=True)
class Acceptance:
    rcpt: str | None
    verdict: Verdict
    entry: Entry | None = None  # None for a rejection
    duplicate: bool = False  # already in the journal: a retry of a message we own


@dataclass
class Received:
    """A message as received, with what was learnt while reading it."""

    body: bytes | Path  # in memory, or (large) a file in the journal's tmp/
    digest: bytes  # sha256 of the message as received: its identity
    head: bytes  # the header block and the start of the body: all the rules read
    size: int
    utf8: bool | None = None  # the whole message is UTF-8 (None: not known yet)
    stored_digest: bytes | None = None  # sha256 of `body` when it is not the message as received

    @property
    def body_digest(self) -> bytes:
        return self.stored_digest or self.digest


def target_fingerprint(digest: bytes, mailbox: str, key: str) -> str:
    """The identity of what GitLab will do with a copy: this message, this mailbox's worker, this key."""
    return fingerprint(digest, mailbox, "\0" + key)


class Intake:
    def __init__(
        self,
        table: RoutingTable,
        journal: Journal,
        dispatcher: Dispatcher | None,
        metrics: Metrics | None = None,
        *,
        siblings: list[Journal] | None = None,
        retry_horizon: float = DEFAULT_RETENTION,
    ) -> None:
        self.table = table
        self.journal = journal
        self.dispatcher = dispatcher
        self.metrics = metrics or (dispatcher.metrics if dispatcher is not None else Metrics())
        # The other workers' shards, read only: a Postfix retry that reaches another worker than the first time
        # finds the entry there (Redis guards Sidekiq delivery on its own; webhook and Maildir need this).
        self.siblings = siblings or []
        # How long after its first delivery a message may come again and find its entry: the journal keeps
        # finished entries that long (spool.retention).
        self.retry_horizon = retry_horizon

    @staticmethod
    def received(raw: bytes) -> Received:
        """A message held in memory (replay, collectors), described the way LMTP describes what it streamed."""
        return Received(raw, hashlib.sha256(raw).digest(), raw[:HEAD_LIMIT], len(raw))

    async def accept(
        self,
        received: Received,
        mail_from: str | None,
        rcpts: list[str | None],
        *,
        ingress: str,
        mailbox: str | None = None,
        keep_rejected: bool = False,
    ) -> list[Acceptance]:
        """Route, dedupe and commit one copy per recipient. Raises JournalError when nothing could be committed;
        a body spilled to tmp/ is always removed. `keep_rejected` journals a rejected copy as dropped, for
        collectors: they cannot refuse a message that is already in the mailbox, and GitLab's rejection mail
        would go to a sender who may be forged."""
        arrived = received.body
        try:
            self.metrics.received(ingress)
            received = await self._for_gitlab(received)
            if len(received.head) > ROUTE_INLINE_LIMIT:
                verdicts = await asyncio.to_thread(self.verdicts, received.head, rcpts, mailbox)
            else:
                verdicts = self.verdicts(received.head, rcpts, mailbox)
            return await self._commit(received, mail_from, rcpts, verdicts, ingress, mailbox, keep_rejected)
        finally:
            if isinstance(arrived, Path):
                self.journal.discard(arrived)

    async def _for_gitlab(self, received: Received) -> Received:
        """The message as GitLab must get it (``eightbit.for_gitlab``): nearly always the very same."""
        if received.utf8 is None and isinstance(received.body, bytes):
            received.utf8 = is_utf8(received.body)
        if received.utf8 and not header_start(received.head):
            return received
        body = received.body
        converted = await asyncio.to_thread(lambda: for_gitlab(body if isinstance(body, bytes) else body.read_bytes()))
        return Received(
            converted, received.digest, converted[:HEAD_LIMIT], received.size, True, hashlib.sha256(converted).digest()
        )

    def verdicts(self, head: bytes, rcpts: list[str | None], mailbox: str | None) -> list[Verdict]:
        """GitLab's verdict on the copy for each recipient (pure: the header is read once for all of them)."""
        header: Header | None = None
        found = []
        for rcpt in rcpts:
            if rcpt is None and mailbox is None:  # a file replayed without a recipient: every mailbox is tried
                found.append(route(self.table, head))
                continue
            header = header or read_header(head)
            if rcpt is None:
                assert mailbox is not None
                blank = not head.strip()
                found.append(
                    Verdict("reject", REASON_BLANK, mailbox) if blank else gitlab_verdict(self.table, header, mailbox)
                )
                continue
            recipient = match_recipient(self.table.restricted_to(mailbox), rcpt)
            if not recipient.accepted:
                reason = f"envelope recipient <{rcpt}>: {recipient.reason}"
                found.append(Verdict("reject", reason, recipient.mailbox))
                continue
            assert recipient.mailbox is not None
            found.append(copy_verdict(self.table, header, rcpt, recipient.mailbox, recipient.key))
        return found

    def _find(self, entry_id: str, drafts: list[Draft], journals: list[Journal]) -> tuple[Entry | None, bool]:
        """The entry with this id, and whether it is this journal's: in this transaction's drafts, this journal,
        or (not this journal's) another worker's shard; `journals` are those searched on disk."""
        found = next((d.entry for d in drafts if d.entry.id == entry_id), None)
        if found is not None:
            return found, True
        for journal in journals:
            found = journal.find(entry_id, DEDUPE_STATES)
            if found is not None:
                return found, journal is self.journal
        return None, True

    async def _commit(
        self,
        received: Received,
        mail_from: str | None,
        rcpts: list[str | None],
        verdicts: list[Verdict],
        ingress: str,
        mailbox: str | None,
        keep_rejected: bool,
    ) -> list[Acceptance]:
        now = time.time()
        results: list[Acceptance] = []
        drafts: list[Draft] = []
        journals = [self.journal, *self.siblings]
        # Each directory searched is a look-up that waits for the journal's writes: the search by the copy's name
        # only goes where an earlier version's deliveries may still be retried.
        copy_named = [journal for journal in journals if journal.copy_named(now - self.retry_horizon)]
        for rcpt, verdict in zip(rcpts, verdicts, strict=True):
            if verdict.verdict == "reject":
                # Over LMTP, RCPT already refused unknown addresses; replayed files and collectors meet them here.
                self.metrics.refused("unknown_address" if verdict.reason.startswith("envelope") else "no_key")
                facts = {"event": "rejected", "verdict": "reject", "reason": verdict.reason, "ingress": ingress}
                log.info("rejected", extra={**facts, "rcpt": rcpt, "mail_from": mail_from, "note": verdict.note})
                if not keep_rejected:
                    results.append(Acceptance(rcpt, verdict))
                    continue
            copy_mailbox = verdict.mailbox or mailbox or "-"
            identity = fingerprint(received.digest, copy_mailbox, rcpt or "")
            existing, mine = self._find(identity[:ID_LENGTH], drafts, copy_named)  # a retry of this very copy
            state, duplicate_of = State.DROPPED, None
            if existing is None and verdict.verdict == "deliver":
                assert verdict.key is not None
                target = target_fingerprint(received.digest, copy_mailbox, verdict.key)
                carrier, mine = self._find(target[:ID_LENGTH], drafts, journals)
                if carrier is None:
                    identity, state = target, State.PENDING
                elif carrier.rcpt == rcpt:
                    existing = carrier  # a retry of the copy that carries the message
                else:
                    duplicate_of = carrier.id  # GitLab would route this copy exactly as that one
            if existing is not None:
                # Another worker's entry is that worker's to deliver.
                if mine and existing.state is State.PENDING and self.dispatcher is not None:
                    self.dispatcher.submit(existing)  # no-op when already on its way; recovers an orphan otherwise
                results.append(Acceptance(rcpt, verdict, existing, duplicate=True))
                continue
            entry = Entry(
                id=identity[:ID_LENGTH],
                fingerprint=identity,
                state=state,
                received_at=now,
                ingress=ingress,
                mail_from=mail_from,
                rcpt=rcpt,
                mailbox=verdict.mailbox or mailbox,
                key=verdict.key,
                handler=verdict.handler,
                source=verdict.source,
                reason=_recorded_reason(verdict, duplicate_of),
                size=received.size,
                drop=None if state is State.PENDING else _drop_kind(verdict, duplicate_of),
                duplicate_of=duplicate_of,
                note=verdict.note,
            )
            drafts.append(Draft(entry, envelope_headers(mail_from, rcpt), received.body, received.body_digest))
            results.append(Acceptance(rcpt, verdict, entry))
        await self.journal.commit(drafts)
        for draft in drafts:
            self._committed(draft, ingress, mail_from)
        return results

    def _committed(self, draft: Draft, ingress: str, mail_from: str | None) -> None:
        entry = draft.entry
        delivering = entry.state is State.PENDING
        self.metrics.committed(entry.mailbox, entry.drop)
        # A copy to deliver gets its one info line when delivered (or a warning when it must wait); the commit
        # is a debug line. A dropped copy's line is this one.
        log.log(
            logging.DEBUG if delivering else logging.INFO,
            "accepted" if delivering else "dropped",
            extra={
                "event": "accepted" if delivering else "dropped",
                "journal_id": entry.id,
                "mailbox": entry.mailbox,
                "key": entry.key,
                "handler": entry.handler,
                "source": entry.source,
                "verdict": "deliver" if delivering else "drop",
                "reason": None if delivering else entry.reason,
                "note": entry.note,
                "ingress": ingress,
                "rcpt": entry.rcpt,
                "mail_from": mail_from,
            },
        )
        if delivering and self.dispatcher is not None:
            in_memory = draft.prefix + draft.body if isinstance(draft.body, bytes) else None
            self.dispatcher.submit(entry, in_memory)  # the first attempt needs no read from disk


def _recorded_reason(verdict: Verdict, duplicate_of: str | None) -> str:
    if duplicate_of is not None:
        return f"same GitLab target as entry {duplicate_of} ({verdict.mailbox}, key {verdict.key!r}): one job for both"
    if verdict.verdict == "reject":
        return f"rejected, kept: {verdict.reason}"
    return verdict.reason


def _drop_kind(verdict: Verdict, duplicate_of: str | None) -> str:
    if duplicate_of is not None:
        return "duplicate"
    return verdict.drop or "rejected"
