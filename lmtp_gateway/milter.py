"""A Postfix milter: GitLab's verdict on each copy while the sending server is still connected.

At RCPT the policy service can refuse an address no GitLab mailbox has, but some refusals depend on the
headers: a dedicated address (no ``%{key}``) whose mail has no key in its References, or a copy whose first key
fits no GitLab handler. Refused after Postfix has queued the message, such mail would make Postfix send a
non-delivery notification to a sender who may be forged (backscatter). This milter applies the same rules
(``rules.copy_verdict``) at the end of DATA, before Postfix queues anything:

* every GitLab recipient's copy would be refused: ``550`` to the sending server, which tells its own user;
* some would and some would not: the others are kept, the refused ones are removed from the message (their
  senders cannot be told for one recipient among several without a bounce), each with a log line;
* otherwise the message goes on, to be delivered over LMTP.

The milter protocol (version 6, as Postfix speaks it: ``milter_protocol = 6``) is small and is written here on
asyncio: the MTA opens a connection, negotiates which events it sends, then sends one packet per event
(``uint32 length``, a command byte, its data); the milter answers the events that want an answer. The gateway
asks for the recipients and the headers only, and answers headers not at all, so a message costs one round trip
per recipient and one at its end.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass, field

from lmtp_gateway.eightbit import for_gitlab
from lmtp_gateway.headers import read_header
from lmtp_gateway.intake import ROUTE_INLINE_LIMIT
from lmtp_gateway.listen import StreamService
from lmtp_gateway.rules import RoutingTable, Verdict, copy_verdict, match_recipient

log = logging.getLogger(__name__)

VERSION = 6
MAX_PACKET = 1 << 20  # Postfix sends at most 64 KiB per packet; anything larger is not an MTA
MAX_HEADER = 1 << 20  # as much of a header as LMTP intake reads

# what the gateway may do to a message (SMFIF_*), and which events it does not want (SMFIP_*)
DELETE_RECIPIENT = 0x08
NO_CONNECT, NO_HELO, NO_MAIL, NO_BODY, NO_EOH = 0x01, 0x02, 0x04, 0x10, 0x40
NO_REPLY_HEADER, NO_UNKNOWN, NO_DATA = 0x80, 0x100, 0x200
HEADER_LEADING_SPACE = 0x100000
WANTED = NO_CONNECT | NO_HELO | NO_MAIL | NO_BODY | NO_EOH | NO_REPLY_HEADER | NO_UNKNOWN | NO_DATA
WANTED |= HEADER_LEADING_SPACE

CONTINUE, REPLY_CODE, DELETE = b"c", b"y", b"-"


@dataclass
class Decision:
    """The answer at the end of a message: a refusal for all, or the recipients to remove (maybe none)."""

    refusal: str | None = None
    removed: list[tuple[str, Verdict]] = field(default_factory=list)


def decide(table: RoutingTable, header: bytes, rcpts: list[str]) -> Decision:
    """GitLab's verdict on each GitLab recipient's copy of a message with this header (pure)."""
    parsed = read_header(for_gitlab(header + b"\r\n"))
    refused = []
    for rcpt in rcpts:
        recipient = match_recipient(table, rcpt)
        if not recipient.accepted or recipient.mailbox is None:
            continue  # not GitLab's (the policy service refused those of its domains already)
        verdict = copy_verdict(table, parsed, rcpt, recipient.mailbox, recipient.key)
        if verdict.verdict == "reject":
            refused.append((rcpt, verdict))
    if refused and len(refused) == len(rcpts):
        reasons = {verdict.reason for _, verdict in refused}
        return Decision(refusal=f"550 5.1.1 {' '.join(sorted(reasons))}")
    return Decision(removed=refused)


class MilterServer(StreamService):
    name, key, limit = "milter", "milter.listen", MAX_PACKET

    def __init__(self, table: RoutingTable) -> None:
        super().__init__()
        self.table = table

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _Session(self.table, reader, writer).run()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as error:
            log.debug("milter: session ended: %s", error)
        finally:
            writer.close()


class _Session:
    """One MTA connection: any number of messages, one after the other."""

    def __init__(self, table: RoutingTable, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.table = table
        self.reader = reader
        self.writer = writer
        self.rcpts: list[str] = []
        self.header = bytearray()
        self.leading_space = False
        self.reply_headers = True

    async def run(self) -> None:
        while True:
            size = struct.unpack("!I", await self.reader.readexactly(4))[0]
            if not 0 < size <= MAX_PACKET:
                raise ValueError(f"packet of {size} bytes")
            packet = await self.reader.readexactly(size)
            command, data = packet[:1], packet[1:]
            if command == b"O":
                await self._negotiate(data)
            elif command == b"R":
                self.rcpts.append(_address(data))
                await self._send(CONTINUE)
            elif command == b"L":
                self._add_header(data)
                if self.reply_headers:
                    await self._send(CONTINUE)
            elif command == b"E":
                await self._end_of_message()
            elif command in (b"A", b"K"):  # abort this message (K: a new connection's worth, on this one)
                self._reset()
            elif command == b"Q":
                return
            elif command != b"D":  # macros want no answer; any other event is let through
                await self._send(CONTINUE)

    async def _negotiate(self, data: bytes) -> None:
        """Only what the MTA offers can be asked for; an MTA of an older version gets that version back."""
        version, actions, offered = struct.unpack("!III", data[:12])
        protocol = WANTED & offered
        self.leading_space = bool(protocol & HEADER_LEADING_SPACE)
        self.reply_headers = not protocol & NO_REPLY_HEADER
        await self._send(b"O" + struct.pack("!III", min(version, VERSION), DELETE_RECIPIENT & actions, protocol))

    def _add_header(self, data: bytes) -> None:
        name, _, rest = data.partition(b"\0")
        value = rest.split(b"\0", 1)[0]
        if len(self.header) < MAX_HEADER:
            separator = b":" if self.leading_space else b": "
            self.header += name + separator + value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"

    async def _end_of_message(self) -> None:
        header, rcpts = bytes(self.header), list(self.rcpts)
        self._reset()
        if len(header) > ROUTE_INLINE_LIMIT:
            decision = await asyncio.to_thread(decide, self.table, header, rcpts)
        else:
            decision = decide(self.table, header, rcpts)
        if decision.refusal is not None:
            facts = {"event": "rejected", "rcpt": ",".join(rcpts), "reason": decision.refusal}
            log.info("refused before queueing: %s", decision.refusal, extra=facts)
            await self._send(REPLY_CODE + decision.refusal.encode("utf-8", "replace") + b"\0")
            return
        for rcpt, verdict in decision.removed:
            log.warning(
                "removed a recipient GitLab would refuse, before queueing: %s",
                verdict.reason,
                extra={"event": "rejected", "rcpt": rcpt, "reason": verdict.reason, "note": verdict.note},
            )
            self.writer.write(_packet(DELETE, f"<{rcpt}>".encode() + b"\0"))
        await self._send(CONTINUE)

    def _reset(self) -> None:
        self.rcpts.clear()
        self.header.clear()

    async def _send(self, reply: bytes) -> None:
        self.writer.write(_packet(reply[:1], reply[1:]))
        await self.writer.drain()


def _packet(command: bytes, data: bytes) -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def _address(data: bytes) -> str:
    """The first argument of a RCPT event (``<address>``), as text without the brackets."""
    return data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape").strip().removeprefix("<").removesuffix(">")
