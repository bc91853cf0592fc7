"""A Postfix policy service (SMTPD_POLICY_README): refuse at SMTP time what the gateway would refuse at RCPT.

Postfix asks before it accepts a recipient from the internet; answering here, from the same rules the LMTP
listener uses, means an unknown GitLab address is refused to the sending server with ``550`` and never bounced
later (no backscatter to forged senders). It answers at once, unlike recipient address verification, which
sends a probe through the queue and keeps the sending server waiting a second or more for each new address,
and it has no cache that can go stale when the configuration changes.

Recipients in domains the gateway does not serve get ``DUNNO`` (no opinion), so the service can sit in a Postfix
that also handles other mail.

It runs apart from ``serve`` (``lmtp-gateway policy``), spawned by Postfix's master per connection or as its own
small daemon, so that while the LMTP daemon is down (an upgrade, a crash) Postfix still tells good addresses from
bad ones: it accepts and queues mail for valid GitLab addresses and delivers it when the gateway is back, and
still refuses the rest at SMTP time.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from lmtp_gateway.listen import StreamService
from lmtp_gateway.rules import RoutingTable, match_recipient

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024  # Postfix sends a few hundred bytes; anything larger is not Postfix


def policy_action(table: RoutingTable, request: dict[str, str]) -> str:
    """The ``action=`` for one request (pure: the rules decide)."""
    if request.get("request") != "smtpd_access_policy" or request.get("protocol_state", "RCPT") != "RCPT":
        return "DUNNO"
    recipient = request.get("recipient", "")
    domain = recipient.rpartition("@")[2].lower()
    if not recipient or domain not in {template.domain.lower() for _, template in table.mailboxes}:
        return "DUNNO"
    found = match_recipient(table, recipient)
    if found.accepted:
        return "DUNNO"
    return f"550 5.1.1 <{recipient}>: Recipient address rejected: {found.reason}"


def parse_request(block: bytes) -> dict[str, str]:
    """The name=value lines of one request (the empty line that ends it already cut off)."""
    fields: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition("=")
        fields[name] = value
    return fields


class PolicyServer(StreamService):
    name, key, limit = "policy service", "policy.listen", MAX_REQUEST

    def __init__(self, table: RoutingTable) -> None:
        super().__init__()
        self.table = table

    def serve_stdio(self) -> None:
        """One session on standard input and output, as Postfix's spawn(8) runs a policy server."""
        block = bytearray()
        for line in sys.stdin.buffer:
            if line.strip():
                block += line
                if len(block) > MAX_REQUEST:
                    return
                continue
            sys.stdout.buffer.write(self._answer(parse_request(bytes(block))))
            sys.stdout.buffer.flush()
            block.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One Postfix connection: requests (name=value lines, then an empty line), one answer each."""
        try:
            while True:
                block = await asyncio.wait_for(reader.readuntil(b"\n\n"), 300)
                writer.write(self._answer(parse_request(block)))
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return  # closed, idle too long, or not Postfix (a request larger than MAX_REQUEST)
        finally:
            writer.close()

    def _answer(self, request: dict[str, str]) -> bytes:
        action = policy_action(self.table, request)
        if action != "DUNNO":
            log.info(
                "refused at SMTP time", extra={"event": "rejected", "rcpt": request.get("recipient"), "reason": action}
            )
        return f"action={action}\n\n".encode()
