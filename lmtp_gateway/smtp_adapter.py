"""The one place that reaches into aiosmtpd's and asyncio's internals.

aiosmtpd's public surface (handler hooks, ``smtp_<VERB>`` methods) is not enough for real LMTP: the session needs
its own command-length limits, bulk reads of DATA, bytes read too far handed back to the command loop, several
reply lines in one write, and the transaction state reset at the right moments. Each of those uses a private name
of aiosmtpd (or of asyncio's StreamReader), and each is wrapped here under a public one.
``tests/test_smtp_adapter.py`` pins every one against the installed aiosmtpd, so an upgrade that changes one
fails there, by name, instead of somewhere in a mail session.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Iterable

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
PLAIN_PATH = re.compile(rf"\s*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(\s.*|)\Z", re.DOTALL)


def unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put `data` back in front of what `reader` holds: the next read returns it first."""
    reader._buffer[:0] = data  # type: ignore[attr-defined]


class LmtpAdapter(LMTP):
    """aiosmtpd's LMTP server protocol, with its internals behind the methods below."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # aiosmtpd keeps the command length limits in one dict shared by every session of the class, and clears it
        # whenever a connection is made: a limit raised for one session was undone by the next client connecting.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)

    def set_command_limit(self, verb: str, length: int) -> None:
        """The longest `verb` line this session accepts (RFC 1870 and RFC 6531 lengthen MAIL)."""
        self.command_size_limits[verb] = length

    def command_limit(self, verb: str) -> int:
        return self.command_size_limits[verb]

    async def read_some(self, size: int) -> bytes:
        """Up to `size` bytes as they arrive (DATA is read in bulk, not line by line)."""
        return await self._reader.read(size)

    def unread(self, data: bytes) -> None:
        """Hand bytes read past the end of DATA (pipelined commands) back to the command loop."""
        unread(self._reader, data)

    async def write_lines(self, lines: Iterable[str]) -> None:
        """Several reply lines in one write (LHLO, the per-recipient replies after DATA): one packet, one drain."""
        assert self._writer is not None
        self._writer.write("".join(f"{line}\r\n" for line in lines).encode("utf-8", "surrogateescape"))
        await self._writer.drain()

    def start_transaction(self) -> None:
        """Forget MAIL and RCPT (LHLO, like EHLO, starts afresh)."""
        self._set_rset_state()

    def end_transaction(self) -> None:
        """After DATA: a fresh envelope for the next MAIL."""
        self._set_post_data_state()

    def still_active(self) -> None:
        """Restart the idle timeout: it is for a silent client, not for a long message arriving."""
        self._reset_timeout()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The common `<local@domain> PARAMS` without the stdlib's full RFC 5322 parser, which costs about a tenth
        of a millisecond per command; anything unusual (quoted local parts, address literals, <>) still goes to
        aiosmtpd's own parser."""
        found = PLAIN_PATH.match(arg)
        if found is None or self.local_part_limit:
            return super()._getaddr(arg)
        return found.group(1), found.group(2).lstrip()
