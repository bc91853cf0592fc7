"""Intake: route one received message for each of its recipients, commit it to the journal, hand it on.

Every way in (LMTP, replay, the collectors) ends here, so the rules, the dedupe and the journal are applied the
same way whatever the source. What comes back is one ``Acceptance`` per recipient, in order, for the caller to
turn into its own answer (an LMTP reply, an IMAP flag, a line of ``replay`` output).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lmtp_gateway.dispatch import Dispatcher
from lmtp_gateway.headers import parse_headers
from lmtp_gateway.journal import ID_LENGTH, Draft, Entry, Journal, State, envelope_headers, fingerprint
from lmtp_gateway.metrics import Metrics
from lmtp_gateway.rules import RoutingTable, Verdict, match_recipient, route

log = logging.getLogger(__name__)

HEAD_LIMIT = 1 << 20  # the rules read headers only; keep at most this much of a message for them


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
    digest: bytes  # sha256 of the message as received
    head: bytes  # the header block and the start of the body: all the rules read
    size: int


class Intake:
    def __init__(
        self, table: RoutingTable, journal: Journal, dispatcher: Dispatcher | None, metrics: Metrics | None = None
    ) -> None:
        self.table = table
        self.journal = journal
        self.dispatcher = dispatcher
        self.metrics = metrics or (dispatcher.metrics if dispatcher is not None else Metrics())

    def _mailbox_of(self, rcpt: str | None, watched: str | None) -> str | None:
        """The mailbox a dropped copy was addressed to (the rules stop at "auto-generated" before looking)."""
        if watched is not None or rcpt is None:
            return watched
        return match_recipient(self.table, rcpt).mailbox

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
        try:
            return await self._accept(received, mail_from, rcpts, ingress, mailbox, keep_rejected)
        finally:
            if isinstance(received.body, Path):
                self.journal.discard(received.body)

    async def _accept(
        self,
        received: Received,
        mail_from: str | None,
        rcpts: list[str | None],
        ingress: str,
        mailbox: str | None,
        keep_rejected: bool,
    ) -> list[Acceptance]:
        self.metrics.received(ingress)
        headers = parse_headers(received.head)
        now = time.time()
        results: list[Acceptance] = []
        drafts: list[Draft] = []
        for rcpt in rcpts:
            verdict = route(self.table, received.head, rcpt=rcpt, mailbox=mailbox, headers=headers)
            if verdict.verdict == "reject":
                # Over LMTP, RCPT already refused unknown addresses; replayed files and collectors meet them here.
                self.metrics.refused("unknown_address" if verdict.reason.startswith("envelope") else "no_key")
                facts = {"event": "rejected", "verdict": "reject", "reason": verdict.reason, "ingress": ingress}
                log.info("rejected", extra={**facts, "rcpt": rcpt, "mail_from": mail_from})
                if not keep_rejected:
                    results.append(Acceptance(rcpt, verdict))
                    continue
            identity = fingerprint(received.digest, verdict.mailbox or mailbox or "-", rcpt or "")
            existing = self.journal.find(identity[:ID_LENGTH]) or next(
                (d.entry for d in drafts if d.entry.fingerprint == identity), None
            )
            if existing is not None:
                if existing.state is State.PENDING and self.dispatcher is not None:
                    self.dispatcher.submit(existing)  # no-op when already on its way; recovers an orphan otherwise
                results.append(Acceptance(rcpt, verdict, existing, duplicate=True))
                continue
            entry = Entry(
                id=identity[:ID_LENGTH],
                fingerprint=identity,
                state=State.PENDING if verdict.verdict == "deliver" else State.DROPPED,
                received_at=now,
                ingress=ingress,
                mail_from=mail_from,
                rcpt=rcpt,
                mailbox=verdict.mailbox or mailbox,
                key=verdict.key,
                handler=verdict.handler,
                source=verdict.source,
                reason=verdict.reason if verdict.verdict != "reject" else f"rejected, kept: {verdict.reason}",
                size=received.size,
            )
            drafts.append(Draft(entry, envelope_headers(mail_from, rcpt), received.body))
            results.append(Acceptance(rcpt, verdict, entry))
        await self.journal.commit(drafts)
        for draft in drafts:
            entry = draft.entry
            event = "accepted" if entry.state is State.PENDING else "dropped"
            self.metrics.committed(entry.mailbox or self._mailbox_of(entry.rcpt, mailbox), entry.state is State.DROPPED)
            log.info(
                event,
                extra={
                    "event": event,
                    "journal_id": entry.id,
                    "mailbox": entry.mailbox,
                    "key": entry.key,
                    "handler": entry.handler,
                    "source": entry.source,
                    "verdict": "deliver" if entry.state is State.PENDING else "drop",
                    "ingress": ingress,
                    "rcpt": entry.rcpt,
                    "mail_from": mail_from,
                },
            )
            if entry.state is State.PENDING and self.dispatcher is not None:
                in_memory = draft.prefix + draft.body if isinstance(draft.body, bytes) else None
                self.dispatcher.submit(entry, in_memory)  # the first attempt needs no read from disk
        return results
