"""A small LMTP client for tests: pipelines like Postfix and reads one DATA reply per accepted recipient.

Python's smtplib.LMTP reads only one reply after DATA, which is exactly the bug the gateway must not have, so
the tests speak the protocol themselves.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class Transaction:
    mail: str
    rcpt_replies: list[str]  # one reply per RCPT
    data: str | None  # the 354 (or refusal) reply
    results: list[str]  # one reply per accepted recipient after the message


class LmtpClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting = ""
        self.capabilities: list[str] = []

    @classmethod
    async def connect(cls, address: str) -> LmtpClient:
        if address.startswith("unix:"):
            reader, writer = await asyncio.open_unix_connection(address.removeprefix("unix:"), limit=1 << 20)
        else:
            host, _, port = address.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
        client = cls(reader, writer)
        client.greeting = await client.reply()
        return client

    async def reply(self) -> str:
        """One (possibly multi-line) reply, joined with newlines."""
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 30)).decode("utf-8", "replace")
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return "\n".join(lines)

    async def command(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def lhlo(self, name: str = "client.test") -> str:
        answer = await self.command(f"LHLO {name}")
        self.capabilities = [line[4:] for line in answer.splitlines()[1:]]
        return answer

    async def send(self, mail_from: str, rcpts: list[str], message: bytes, *, params: str = "") -> Transaction:
        """MAIL, every RCPT and DATA in one write (PIPELINING), then the message, then the per-recipient replies."""
        commands = [f"MAIL FROM:<{mail_from}>{params}", *[f"RCPT TO:<{r}>" for r in rcpts], "DATA"]
        self.writer.write("".join(f"{c}\r\n" for c in commands).encode())
        await self.writer.drain()
        mail = await self.reply()
        rcpt_replies = [await self.reply() for _ in rcpts]
        data = await self.reply()
        accepted = sum(reply.startswith("250") for reply in rcpt_replies)
        if not data.startswith("354"):
            return Transaction(mail, rcpt_replies, data, [])
        self.writer.write(dot_stuff(message))
        await self.writer.drain()
        results = [await self.reply() for _ in range(accepted)]
        return Transaction(mail, rcpt_replies, data, results)

    async def quit(self) -> None:
        try:
            await self.command("QUIT")
        finally:
            self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()


def dot_stuff(message: bytes) -> bytes:
    """The message as it goes on the wire: CRLF lines, leading dots doubled, ending with CRLF.CRLF."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    body = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return body + b".\r\n"
