"""LMTP ingress: where Postfix hands over mail and where every ``250`` is sent.

Built on aiosmtpd's LMTP class, with what it lacks for real LMTP (RFC 2033) added here:

* ``LHLO`` advertises PIPELINING, ENHANCEDSTATUSCODES, 8BITMIME, SMTPUTF8 and SIZE, and every later reply carries
  an enhanced status code;
* ``RCPT`` is answered from GitLab's rules (``550 5.1.1`` for an address no mailbox owns), so Postfix's
  ``reject_unverified_recipient`` can refuse it at SMTP time;
* after ``DATA`` there is exactly one reply per accepted recipient, in RCPT order, in every path: success,
  message too large, line too long, journal failure, internal error;
* DATA is read in bulk and streamed to the journal's tmp directory, never held whole in memory.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hashlib
import logging
import re
import socket
from pathlib import Path
from typing import Any, BinaryIO

from aiosmtpd.smtp import Envelope, Session

from lmtp_gateway.config import LmtpConfig
from lmtp_gateway.errors import JournalError, storage_error_text
from lmtp_gateway.intake import HEAD_LIMIT, Acceptance, Intake, Received
from lmtp_gateway.journal import Journal, State
from lmtp_gateway.listen import Address, Server
from lmtp_gateway.rules import RoutingTable, match_recipient
from lmtp_gateway.smtp_adapter import LmtpAdapter

log = logging.getLogger(__name__)

# RFC 5321 4.5.3.1.4: 512 for a command line; RFC 1870 adds 26 for SIZE= and RFC 6531 10 for SMTPUTF8.
MAIL_LINE_LIMIT = 512 + 26 + 10
MAX_LINE = 1000  # RFC 5321 4.5.3.1.6: 998 octets + CRLF; Postfix's LMTP client folds longer lines itself
READ_SIZE = 256 * 1024
SPILL_SIZE = 1 << 20  # messages up to this size stay in memory until they are committed
LATER = "too many recipients for a message of this size in one transaction, send the rest later"


class DataDecoder:
    """Incremental SMTP DATA decoder: finds the lone-dot line, undoes dot-stuffing, checks line lengths.

    Works on whole lines only: an incomplete line is carried to the next chunk, so a dot-stuffed line or the
    end marker split across reads is still seen. Linear in the input.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self.done = False
        self.line_too_long = False
        self.leftover = b""  # bytes after the end marker (a client pipelining past DATA)
        self._carry = b""
        self._skipping = False  # inside an over-long line: drop bytes until its end

    def feed(self, chunk: bytes) -> bytes:
        """Decoded message bytes from `chunk` that are complete; empty once the end marker was seen."""
        data = self._carry + chunk
        cut = data.rfind(b"\n") + 1
        lines, self._carry = data[:cut], data[cut:]
        if self._skipping and lines:
            lines = lines[lines.find(b"\n") + 1 :]
            self._skipping = False
        if len(self._carry) > self.max_line + 1:  # a line longer than any terminator: stop buffering it
            self.line_too_long = True
            self._skipping = True
            self._carry = b""
        end = (b"\n" + lines).find(b"\n.\r\n")
        if end >= 0:
            self.done = True
            self.leftover = lines[end + 3 :] + self._carry
            lines = lines[:end]
        if lines and not self.line_too_long and max(map(len, lines.split(b"\n"))) > self.max_line + 1:
            self.line_too_long = True
        if lines.startswith(b"."):
            lines = lines[1:]
        return lines.replace(b"\n.", b"\n")


# Enhanced codes for aiosmtpd's own replies, which have none (RFC 3463).
_ENHANCED_FOR = {
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.0.0",
    "421": "4.3.0",
    "451": "4.3.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "550": "5.1.1",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}\b")


def with_enhanced_code(reply: str) -> str:
    if _HAS_ENHANCED.match(reply) or len(reply) < 3 or reply[:3] not in _ENHANCED_FOR:
        return reply
    separator = reply[3:4] or " "
    text = reply[4:].removeprefix("Error: ")
    return f"{reply[:3]}{separator}{_ENHANCED_FOR[reply[:3]]} {text}".rstrip()


_DROPPED_REPLIES = {
    "auto_generated": "discarded: auto-generated",
    "gitlab_fails": "discarded: GitLab's receiver cannot process it",
}


def data_reply(acceptance: Acceptance, rcpt: str) -> str:
    """The per-recipient reply after DATA (the table in docs/operations.md)."""
    verdict, entry = acceptance.verdict, acceptance.entry
    if verdict.verdict == "reject":
        return f"550 5.1.1 <{rcpt}> {verdict.reason}"
    assert entry is not None
    if acceptance.duplicate:
        return f"250 2.0.0 <{rcpt}> {entry.id} already queued"
    if entry.duplicate_of is not None:
        return f"250 2.0.0 <{rcpt}> {entry.id} same GitLab target as {entry.duplicate_of}: delivered once"
    if entry.state is State.DROPPED:
        return f"250 2.0.0 <{rcpt}> {entry.id} {_DROPPED_REPLIES.get(entry.drop or '', 'discarded')}"
    return f"250 2.0.0 <{rcpt}> {entry.id} queued"


class LmtpSession(LmtpAdapter):
    """One LMTP connection. aiosmtpd drives the command loop; this class fixes what LMTP needs."""

    # The stream reader's buffer limit: large, so DATA is read in big chunks (command lines are still limited
    # to 512 bytes by aiosmtpd's own check).
    line_length_limit = READ_SIZE

    def __init__(self, server: LmtpServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self.server = server
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.server.sessions.discard(self)
        super().connection_lost(error)

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str) and not status.startswith("220 "):
            status = with_enhanced_code(status)
        await super().push(status)

    async def handle_exception(self, error: Exception) -> str:
        log.exception("lmtp: internal error in session with %s", self.session.peer if self.session else "?")
        return "451 4.3.0 Internal error, try again later"

    async def smtp_LHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: LHLO hostname")
            return
        self.start_transaction()
        assert self.session is not None
        self.session.host_name = hostname
        self.session.extended_smtp = True
        self.set_command_limit("MAIL", MAIL_LINE_LIMIT)
        await self.write_lines(
            [
                f"250-{self.hostname}",
                "250-PIPELINING",
                "250-ENHANCEDSTATUSCODES",
                f"250-SIZE {self.data_size_limit}",
                "250-8BITMIME",
                "250 SMTPUTF8",
            ]
        )

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed("LHLO"):
            return
        envelope = self.envelope
        assert envelope is not None
        rcpts = list(envelope.rcpt_tos)  # only accepted recipients: handle_RCPT appends them
        if envelope.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not rcpts:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self.busy = True
        try:
            mail_from = "" if envelope.mail_from == "<>" else envelope.mail_from  # the null sender
            replies = await self._receive_and_commit(mail_from, rcpts)
            assert len(replies) == len(rcpts)
            await self.write_lines(replies)
        finally:
            self.busy = False
            self.end_transaction()
            self.server.session_idle.set()

    async def _receive_and_commit(self, mail_from: str, rcpts: list[str]) -> list[str]:
        """Read DATA and answer for each recipient. Only a lost connection escapes (nothing half-written counts:
        a spilled file is removed and no reply is due)."""
        limit = self.data_size_limit
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        spool = _DataSpool(self.server.intake.journal)
        handed_over = False
        try:
            received, problem = await self._read_data(spool, limit)
            if problem == "size":
                return self._refuse(rcpts, "too_large", "552 5.3.4", f"message exceeds the size limit of {limit} bytes")
            if problem == "line":
                return self._refuse(
                    rcpts, "line_too_long", "500 5.5.2", f"line longer than {MAX_LINE} bytes (RFC 5321)"
                )
            if problem:
                return self._refuse(rcpts, "journal_error", "452 4.3.1", f"{problem}; try again later")
            assert received is not None
            handed_over = True  # from here the intake owns (and always removes) a spilled file
            # Copies past the transaction's byte bound wait for a later transaction (Postfix sends them again).
            taken = max(1, self.server.max_transaction_bytes // max(received.size, 1))
            later = self._refuse(rcpts[taken:], "too_many_recipients", "452 4.5.3", LATER)
            try:
                # Shielded: once the whole message is here, a client hanging up must not cut a commit in half.
                acceptances = await asyncio.shield(
                    self.server.intake.accept(received, mail_from, list(rcpts[:taken]), ingress="lmtp")
                )
            except JournalError as error:
                now = self._refuse(rcpts[:taken], "journal_error", "452 4.3.1", f"{error}; try again later")
                return now + later
            except Exception:
                log.exception("lmtp: internal error while committing")
                now = self._refuse(rcpts[:taken], "internal_error", "451 4.3.0", "internal error, try again later")
                return now + later
            return [data_reply(a, rcpt) for a, rcpt in zip(acceptances, rcpts[:taken], strict=True)] + later
        finally:
            if not handed_over:
                spool.discard()

    def _refuse(self, rcpts: list[str], reason: str, code: str, text: str) -> list[str]:
        """The same refusal for every recipient (`code` such as "552 5.3.4"): counted per recipient, logged once."""
        if not rcpts:
            return []
        self.server.intake.metrics.refused(reason, len(rcpts))
        level = logging.WARNING if reason == "journal_error" else logging.INFO
        facts = {"event": "rejected", "reason": reason, "rcpt": ",".join(rcpts)}
        log.log(level, "refused after DATA: %s", reason, extra=facts)
        return [f"{code} <{rcpt}> {text}" for rcpt in rcpts]

    async def _read_data(self, spool: _DataSpool, limit: int | None) -> tuple[Received | None, str | None]:
        """Read DATA to its end. Returns (received, None) or (None, problem); a problem never stops the reading,
        so the client always gets its replies at the right place."""
        decoder = DataDecoder()
        digest = hashlib.sha256()
        text = codecs.getincrementaldecoder("utf-8")()  # is it UTF-8 throughout? (GitLab needs it to be)
        utf8 = True
        size = 0
        problem: str | None = None
        while not decoder.done:
            chunk = await self.read_some(READ_SIZE)
            if not chunk:
                raise ConnectionResetError("client closed the connection during DATA")
            self.still_active()
            data = decoder.feed(chunk)
            size += len(data)
            if decoder.line_too_long and problem is None:
                problem = "line"
            if limit and size > limit and problem is None:
                problem = "size"
            if problem is None and data:
                digest.update(data)
                utf8 = utf8 and _still_utf8(text, data)
                problem = spool.write(data)
        if decoder.leftover:  # commands pipelined past the end of DATA: give them back to the command loop
            self.unread(decoder.leftover)
        body, trouble = spool.finish()
        problem = problem or trouble
        if problem:
            return None, problem
        return Received(body, digest.digest(), spool.head, size, utf8 and _still_utf8(text, b"", final=True)), None


def _still_utf8(decoder: codecs.IncrementalDecoder, data: bytes, *, final: bool = False) -> bool:
    try:
        decoder.decode(data, final)
    except UnicodeDecodeError:
        return False
    return True


class _DataSpool:
    """Where a message goes while it arrives: memory, or past SPILL_SIZE a file in the journal's tmp/. It also
    keeps the message's first HEAD_LIMIT bytes for the rules: the memory itself, or what it held when it spilled
    (no second copy of every message)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.memory = bytearray()
        self.head = b""
        self.path: Path | None = None
        self.handle: BinaryIO | None = None

    def write(self, data: bytes) -> str | None:
        """Keep `data`; a problem (disk full…) as text, to be answered once DATA is over."""
        try:
            if self.handle is None and len(self.memory) + len(data) <= SPILL_SIZE:
                self.memory += data
                return None
            if self.handle is None:
                self.head = bytes((self.memory + data)[:HEAD_LIMIT])
                self.path, self.handle = self.journal.new_tmp()
                self.handle.write(self.memory)
                self.memory = bytearray()
            self.handle.write(data)
        except JournalError as error:
            return str(error)
        except OSError as error:
            return storage_error_text(error)
        return None

    def finish(self) -> tuple[bytes | Path, str | None]:
        if self.handle is None:
            body = bytes(self.memory)
            self.head = body[:HEAD_LIMIT]
            return body, None
        try:
            self.handle.close()  # flushes: a full disk may only show here
        except OSError as error:
            return b"", storage_error_text(error)
        assert self.path is not None
        return self.path, None

    def discard(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
        if self.path is not None:
            self.journal.discard(self.path)


def address_problem(address: str) -> str | None:
    """Why an envelope address cannot be taken: it must be UTF-8 (RFC 6531) and free of control characters, as
    it becomes a line of the message (Return-Path, Delivered-To) and of the journal's metadata."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if any(char < " " or char == "\x7f" for char in address):
        return "control characters in the address"
    return None


def declared_size(options: list[str]) -> int:
    """The SIZE= a client declared with MAIL (RFC 1870), or 0."""
    for option in options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


class LmtpServer:
    """The hooks aiosmtpd calls (as its 'handler'), the listeners, and the sessions to drain on shutdown."""

    def __init__(
        self,
        table: RoutingTable,
        intake: Intake,
        *,
        max_message_size: int,
        max_recipients: int = LmtpConfig.max_recipients,
        max_transaction_bytes: int = LmtpConfig.max_transaction_bytes,
        hostname: str | None = None,
        timeout: float = 300.0,
    ) -> None:
        self.table = table
        self.intake = intake
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.max_transaction_bytes = max_transaction_bytes
        self.hostname = hostname or socket.getfqdn()
        self.timeout = timeout
        self.sessions: set[LmtpSession] = set()
        self.session_idle = asyncio.Event()
        self.servers: list[Server] = []
        self.addresses: list[str] = []

    # aiosmtpd hooks

    async def handle_MAIL(self, server: LmtpSession, session: Session, envelope: Envelope, address: str, options):
        problem = address_problem(address)
        if problem:
            self._refuse_address("mail_from", problem)
            return f"553 5.1.7 Sender address rejected: {problem}"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(self, server: LmtpSession, session: Session, envelope: Envelope, address: str, options):
        problem = address_problem(address)
        if problem:
            self._refuse_address("rcpt", problem)
            return f"553 5.1.3 Recipient address rejected: {problem}"
        if len(envelope.rcpt_tos) >= self.max_recipients:
            self.intake.metrics.refused("too_many_recipients")
            return f"452 4.5.3 Too many recipients: at most {self.max_recipients} per transaction, send the rest later"
        declared = declared_size(envelope.mail_options)
        if envelope.rcpt_tos and declared * (len(envelope.rcpt_tos) + 1) > self.max_transaction_bytes:
            self.intake.metrics.refused("too_many_recipients")
            return f"452 4.5.3 {LATER.capitalize()}"
        found = match_recipient(self.table, address)
        if not found.accepted:
            self.intake.metrics.refused("unknown_address" if found.mailbox is None else "unknown_key")
            log.info(
                "rejected at RCPT: %s",
                found.reason,
                extra={"event": "rejected", "rcpt": address, "reason": found.reason, "mail_from": envelope.mail_from},
            )
            return f"550 5.1.1 <{address}> {found.reason}"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient ok"

    def _refuse_address(self, which: str, problem: str) -> None:
        """Counted and logged without the address itself: it is not text that can be written anywhere."""
        self.intake.metrics.refused("bad_address")
        log.info("refused an envelope address: %s %s", which, problem, extra={"event": "rejected", "reason": problem})

    async def handle_RSET(self, server: LmtpSession, session: Session, envelope: Envelope):
        return "250 2.0.0 Ok"

    async def handle_NOOP(self, server: LmtpSession, session: Session, envelope: Envelope, arg: str):
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server: LmtpSession, session: Session, envelope: Envelope):
        return "221 2.0.0 Bye"

    # listeners

    def _factory(self) -> LmtpSession:
        return LmtpSession(
            self,
            hostname=self.hostname,
            ident="lmtp-gateway",
            data_size_limit=self.max_message_size,
            enable_SMTPUTF8=True,
            timeout=self.timeout,
        )

    async def listen(
        self,
        spec: str,
        *,
        socket_mode: int = 0o660,
        socket_group: str | None = None,
        listener: socket.socket | None = None,
    ) -> str:
        """Start one listener: ``HOST:PORT`` (port 0 picks a free one) or ``unix:PATH``, on `listener` when the
        socket is bound already (a worker's, shared with the others). Returns its address."""
        server, bound = await Address.parse(spec).serve(
            self._factory, key="lmtp.listen", socket_mode=socket_mode, socket_group=socket_group, listener=listener
        )
        self.servers.append(server)
        self.addresses.append(str(bound))
        log.info("listening on %s", bound, extra={"event": "listening", "address": str(bound)})
        return str(bound)

    async def shutdown(self, grace: float = 30.0) -> None:
        """Stop accepting, let transactions in DATA finish (up to `grace` seconds), close idle sessions."""
        for server in self.servers:
            server.close()
        deadline = asyncio.get_running_loop().time() + grace
        while any(s.busy for s in self.sessions):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self.session_idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.session_idle.wait(), remaining)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        for address in self.addresses:
            Address.parse(address).remove()
