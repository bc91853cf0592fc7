"""Where something listens or is reached: ``HOST:PORT`` (``[v6]:PORT``) or ``unix:PATH``, in one place.

The LMTP listeners, the policy service, the monitoring listener, ``check``'s probes and the Postfix fragments all
take addresses of this one form; this module parses them, opens them and prints them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtp_gateway.errors import ListenError, os_error_text

DEFAULT_HOST = "127.0.0.1"
BACKLOG = 100  # asyncio's own default for its servers


@dataclass(frozen=True)
class Address:
    host: str = DEFAULT_HOST
    port: int = 0  # 0 when listening: the system picks a free port
    path: str | None = None  # a UNIX socket

    @classmethod
    def parse(cls, text: str) -> Address:
        """``HOST:PORT``, ``:PORT`` (loopback), ``[::1]:PORT`` or ``unix:PATH``; ValueError says what is expected."""
        text = text.strip()
        if text.startswith("unix:"):
            path = text.removeprefix("unix:")
            if not path:
                raise ValueError("expected unix:/path/to/socket, got an empty path")
            return cls(path=path)
        host, colon, port = text.rpartition(":")
        if not colon or not port.isdigit() or int(port) > 65535 or (":" in host and not host.startswith("[")):
            raise ValueError(f"expected HOST:PORT (such as 127.0.0.1:2424) or unix:PATH, got {text!r}")
        return cls(host=host.strip("[]") or DEFAULT_HOST, port=int(port))

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def connect(self, *, limit: int = 2**16) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.path is not None:
            return await asyncio.open_unix_connection(self.path, limit=limit)
        return await asyncio.open_connection(self.host, self.port, limit=limit)

    def bind(
        self, *, key: str, fix: str | None = None, socket_mode: int = 0o660, socket_group: str | None = None
    ) -> socket.socket:
        """A listening socket, ready to be served here or handed to worker processes. A UNIX socket left by a
        stopped process is replaced. Failure is a ListenError naming the configuration `key` to change, and `fix`
        (default: set `key` to a free address)."""
        try:
            if self.path is None:
                family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                listener = socket.socket(family, socket.SOCK_STREAM)
                try:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    listener.bind((self.host, self.port))
                    listener.listen(BACKLOG)
                except BaseException:
                    listener.close()
                    raise
                return listener
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(str(path))
                os.chmod(path, socket_mode)
                if socket_group:
                    os.chown(path, -1, grp.getgrnam(socket_group).gr_gid)
                listener.listen(BACKLOG)
            except BaseException:
                listener.close()
                raise
            return listener
        except OSError as error:
            advice = fix or f"set {key} to a free HOST:PORT or unix:PATH"
            raise ListenError(f"{key}: cannot listen on {self}: {os_error_text(error)}; {advice}") from None
        except KeyError:
            raise ListenError(f"{key}: socket_group {socket_group!r}: no such group") from None

    def bound(self, listener: socket.socket) -> Address:
        """This address as `listener` is bound (the port the system picked for port 0)."""
        return self if self.path is not None else Address(self.host, listener.getsockname()[1])

    async def serve(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        *,
        key: str,
        fix: str | None = None,
        socket_mode: int = 0o660,
        socket_group: str | None = None,
        listener: socket.socket | None = None,
    ) -> tuple[asyncio.Server, Address]:
        """Listen with `factory` making one protocol per connection, on `listener` (one bound elsewhere, such as
        a worker's inherited socket) or a new one (see `bind`); returns the server and the address bound."""
        if listener is None:
            listener = self.bind(key=key, fix=fix, socket_mode=socket_mode, socket_group=socket_group)
        loop = asyncio.get_running_loop()
        if listener.family == socket.AF_UNIX:
            server = await loop.create_unix_server(factory, sock=listener)
        else:
            server = await loop.create_server(factory, sock=listener)
        return server, self.bound(listener)

    async def serve_streams(
        self,
        callback: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
        *,
        key: str,
        limit: int,
        fix: str | None = None,
        listener: socket.socket | None = None,
    ) -> tuple[asyncio.Server, Address]:
        """As `serve`, for a handler that reads and writes streams (`asyncio.start_server`'s callback)."""
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.StreamReaderProtocol:
            reader = asyncio.StreamReader(limit=limit, loop=loop)
            return asyncio.StreamReaderProtocol(reader, callback, loop=loop)

        return await self.serve(factory, key=key, fix=fix, listener=listener)

    def remove(self) -> None:
        """Remove a UNIX socket's file after the server closed (nothing for TCP)."""
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

