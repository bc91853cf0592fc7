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
from lmtp_gateway.journal import ID_LENGTH, Draft, Entry, Journal, JournalError, State, envelope_headers, fingerprint
from lmtp_gateway.rules import RoutingTable, Verdict, route

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Acceptance:
    rcpt: str | None
    verdict: Verdict
    entry: Entry | None = None  # None for a rejection
    duplicate: bool = False  # already in the journal: a retry of a message we own


@dataclass
class Received:
    """A message written to a tmp file in the journal, with what was learnt while reading it."""

    path: Path
    prefix_length: int  # bytes of envelope headers written before the message (for the first recipient)
    digest: bytes  # sha256 of the message as received (without our prefix)
    head: bytes  # the header block and the start of the body: all the rules read
    size: int  # of the message as received


class Intake:
    def __init__(self, table: RoutingTable, journal: Journal, dispatcher: Dispatcher | None) -> None:
        self.table = table
        self.journal = journal
        self.dispatcher = dispatcher

    def store(self, raw: bytes, mail_from: str | None, first_rcpt: str | None) -> Received:
        """Write a message held in memory (replay, collectors) the way LMTP streams one."""
        path, handle = self.journal.new_tmp()
        prefix = envelope_headers(mail_from, first_rcpt)
        try:
            with handle:
                handle.write(prefix)
                handle.write(raw)
        except OSError as error:
            self.journal.discard(path)
            raise JournalError(str(error)) from error
        return Received(path, len(prefix), hashlib.sha256(raw).digest(), raw[: 1 << 20], len(raw))

    async def accept(
        self,
        received: Received,
        mail_from: str | None,
        rcpts: list[str | None],
        *,
        ingress: str,
        mailbox: str | None = None,
    ) -> list[Acceptance]:
        """Route, dedupe and commit one copy per recipient. Raises JournalError when nothing could be committed;
        the tmp file is always consumed."""
        try:
            return await self._accept(received, mail_from, rcpts, ingress, mailbox)
        finally:
            self.journal.discard(received.path)

    async def _accept(
        self, received: Received, mail_from: str | None, rcpts: list[str | None], ingress: str, mailbox: str | None
    ) -> list[Acceptance]:
        headers = parse_headers(received.head)
        now = time.time()
        results: list[Acceptance] = []
        drafts: list[Draft] = []
        for index, rcpt in enumerate(rcpts):
            verdict = route(self.table, received.head, rcpt=rcpt, mailbox=mailbox, headers=headers)
            if verdict.verdict == "reject":
                results.append(Acceptance(rcpt, verdict))
                continue
            identity = fingerprint(received.digest, verdict.mailbox or "-", rcpt or "")
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
                mailbox=verdict.mailbox,
                key=verdict.key,
                handler=verdict.handler,
                source=verdict.source,
                reason=verdict.reason,
                size=received.size,
            )
            if index == 0:
                drafts.append(self._claim(received, entry))
            else:
                drafts.append(
                    self.journal.draft_copy(
                        received.path, received.prefix_length, envelope_headers(mail_from, rcpt), entry
                    )
                )
            results.append(Acceptance(rcpt, verdict, entry))
        await self.journal.commit(drafts)
        for draft in drafts:
            entry = draft.entry
            log.info(
                "accepted" if entry.state is State.PENDING else "dropped",
                extra={
                    "event": "accepted" if entry.state is State.PENDING else "dropped",
                    "journal_id": entry.id,
                    "mailbox": entry.mailbox,
                    "key": entry.key,
                    "handler": entry.handler,
                    "source": entry.source,
                    "ingress": ingress,
                    "rcpt": entry.rcpt,
                    "mail_from": mail_from,
                },
            )
            if entry.state is State.PENDING and self.dispatcher is not None:
                self.dispatcher.submit(entry)
        return results

    def _claim(self, received: Received, entry: Entry) -> Draft:
        """The first recipient takes the streamed file itself: no copy in the common single-recipient case."""
        claimed = received.path.with_suffix(".eml")
        received.path.rename(claimed)
        received.path = claimed
        return Draft(entry, claimed)
