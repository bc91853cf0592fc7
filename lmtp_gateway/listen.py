"""Where something listens or is reached: ``HOST:PORT`` (``[v6]:PORT``) or ``unix:PATH``, in one place.

The LMTP listeners, the policy service, the monitoring listener, ``check``'s probes and the Postfix fragments all
take addresses of this one form; this module parses them, opens them and prints them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lmtp_gateway.errors import ListenError, os_error_text

log = logging.getLogger(__name__)

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
    ) -> tuple[Server, Address]:
        """Listen with `factory` making one protocol per connection, on a new socket (see `bind`) or on
        `listener`, a socket shared with other processes (a worker's, inherited from its supervisor), served
        one connection at a time; returns the server and the address bound."""
        loop = asyncio.get_running_loop()
        if listener is not None:
            return SharedAcceptor(loop, factory, listener), self.bound(listener)
        listener = self.bind(key=key, fix=fix, socket_mode=socket_mode, socket_group=socket_group)
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
    ) -> tuple[Server, Address]:
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


class Server(Protocol):
    """What the listeners need of a server: asyncio's, or a SharedAcceptor."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class StreamService:
    """A small service Postfix asks during a session (the policy service, the milter): the same connection
    handler on every address it listens on, all closed together, UNIX socket files removed."""

    name = "service"  # for the log line
    key = "listen"  # the configuration key of its addresses, for error messages
    limit = 64 * 1024  # the most read at once: a line or a packet

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.addresses: list[str] = []

    async def listen(self, spec: str) -> str:
        server, bound = await Address.parse(spec).serve_streams(self._serve, key=self.key, limit=self.limit)
        self.servers.append(server)
        self.addresses.append(str(bound))
        log.info("%s on %s", self.name, bound, extra={"event": "listening", "address": str(bound)})
        return str(bound)

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        for address in self.addresses:
            Address.parse(address).remove()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class SharedAcceptor:
    """Serves a listening socket that other processes accept on too, taking one connection per turn.

    asyncio's own server accepts up to its backlog (100) at each wake-up: with several workers on one socket the
    first to wake takes a whole burst, and Postfix's cached LMTP connections then stay with it. Here each worker
    takes one connection and lets the others have the next, so the sessions spread across the workers."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.BaseProtocol],
        listener: socket.socket,
    ) -> None:
        listener.setblocking(False)
        self.loop = loop
        self.factory = factory
        self.listener = listener
        self.sockets = [listener]
        self._task = loop.create_task(self._accept(), name=f"accept-{listener.fileno()}")

    async def _accept(self) -> None:
        while True:
            try:
                connection, _ = await self.loop.sock_accept(self.listener)
            except OSError as error:  # out of descriptors (EMFILE), a connection reset before its accept…
                log.error("accept on %s: %s", self.listener.getsockname(), os_error_text(error))
                await asyncio.sleep(0.1)
                continue
            try:
                await self.loop.connect_accepted_socket(self.factory, connection)
            except Exception:  # the session could not start: that client is gone, the others go on
                log.exception("cannot start a session")
                connection.close()
            await asyncio.sleep(0)  # the next connection is another worker's to take, if it is waiting

    def close(self) -> None:
        self._task.cancel()
        self.listener.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
