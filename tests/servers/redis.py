"""A real ``redis-server`` on a free loopback port, for tests and benchmarks.

No redis-py needed: readiness and the small ``command()`` helper speak RESP
over a plain socket, so benchmark scripts can use this without extras.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, TypeAlias

from . import (
    LOOPBACK,
    ChildServer,
    OnePort,
    _register,
    free_port,
    require_binary,
    start_process,
    wait_until,
)

__all__ = ["RedisError", "RedisServer", "RespValue", "parse_info", "resp_command"]

RespValue: TypeAlias = bytes | int | list["RespValue"] | None


class RedisError(Exception):
    """An ``-ERR ...`` reply from the server."""


class RedisServer(OnePort, ChildServer):
    """Throw-away ``redis-server`` without persistence.

    The port is chosen once and kept for the object's lifetime, so
    ``restart()`` (or ``stop()`` followed by ``start()``) brings Redis back
    on the *same* address - that is how tests simulate "Redis was down for a
    while". Data does not survive a restart (``save ""``, no AOF), exactly
    like a crashed cache.

    Usage::

        with RedisServer() as redis:
            client = make_client(redis.url)
    """

    host: str = LOOPBACK

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | None = None,
        start_timeout: float = 60.0,
        extra_config: dict[str, str] | None = None,
    ) -> None:
        """``extra_config`` adds raw ``directive value`` lines to redis.conf."""
        self._port = port
        # A port of our choosing may be swapped if the first bind loses a
        # race; once served it is fixed, so restarts keep the address.
        self._may_repick_port = port is None
        self._binary = binary
        self._start_timeout = start_timeout
        self._extra_config = dict(extra_config or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None

    # -- public API ---------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """Redis' own log file; worth reading when a test fails."""
        return self.tmpdir / "redis.log"

    def start(self) -> RedisServer:
        """Start redis-server and wait until it answers PING."""
        if self.running:
            return self
        binary = self._binary or require_binary("redis-server", "redis-server")
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        _register(self)
        attempts = 3 if self._may_repick_port else 1
        for attempt in range(attempts):
            try:
                self._spawn(binary)
                self._may_repick_port = False
                return self
            except (RuntimeError, TimeoutError):
                self._kill()
                # Another process may have grabbed the port between
                # free_port() and bind(); try a fresh one.
                if attempt + 1 < attempts and self._port_was_taken():
                    self._port = free_port()
                    continue
                self.stop()
                raise
        raise AssertionError("unreachable")

    def restart(self, downtime: float = 0.0, *, graceful: bool = True) -> None:
        """Stop, stay down for ``downtime`` seconds, start on the same port.

        The data set is empty afterwards (no persistence). ``graceful=False``
        kills with SIGKILL, so clients see connections reset, not closed.
        """
        self._kill(graceful)
        if downtime > 0:
            time.sleep(downtime)
        self.start()

    def ping(self, timeout: float = 1.0) -> bool:
        """True if the server answers ``PING`` with ``+PONG`` right now."""
        try:
            with socket.create_connection((self.host, self.port), timeout) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str | bytes | int, timeout: float = 5.0) -> RespValue:
        """Run one command over a fresh connection and return the reply.

        Simple strings and bulk strings come back as ``bytes``, integers as
        ``int``, nil as ``None``, arrays as lists; ``-ERR`` raises
        :class:`RedisError`. Meant for test set-up and assertions
        (``FLUSHALL``, ``GET``, ``DBSIZE``), not for speed.
        """
        return resp_command(self.host, self.port, *args, timeout=timeout)

    def info(self, section: str = "replication") -> dict[str, str]:
        """``INFO section`` as a dict (``role``, ``connected_slaves``, ``master_link_status``...)."""
        return parse_info(self.command("INFO", section))

    def crash(self) -> None:
        """SIGKILL the server, as a crash would; its directory stays, ``start()`` brings it back on the same
        port (empty: no persistence)."""
        self._kill(graceful=False)

    def configure(self, **directives: str) -> None:
        """Set redis.conf directives for the next ``start()`` (``replicaof="127.0.0.1 6379"``); an empty value
        removes the directive."""
        for key, value in directives.items():
            if value:
                self._extra_config[key] = value
            else:
                self._extra_config.pop(key, None)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.host}:{self._port} {state}>"

    # -- internals ----------------------------------------------------------

    def _spawn(self, binary: str) -> None:
        tmp = self.tmpdir
        conf = tmp / "redis.conf"
        lines = {
            "port": str(self.port),
            "bind": self.host,
            "save": '""',
            "appendonly": "no",
            "daemonize": "no",
            "supervised": "no",
            "dir": str(tmp),
            "logfile": str(self.log_path),
            "databases": "16",
            **self._extra_config,
        }
        conf.write_text("".join(f"{k} {v}\n" for k, v in lines.items()))
        self._proc = start_process([binary, str(conf)], cwd=tmp, output=tmp / "redis.stdout")
        wait_until(
            self.ping,
            timeout=self._start_timeout,
            what=f"redis-server on port {self.port}",
            proc=self._proc,
            log_files=[self.log_path, tmp / "redis.stdout"],
        )

    def _port_was_taken(self) -> bool:
        try:
            return "Address already in use" in self.log_path.read_text()
        except OSError:
            return False


def resp_command(host: str, port: int, *args: str | bytes | int, timeout: float = 5.0) -> RespValue:
    """Run one command over a fresh connection to ``host:port`` (a Redis or a Sentinel) and return the reply."""
    parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection((host, port), timeout) as s:
        s.sendall(payload)
        with s.makefile("rb") as reader:
            return _read_reply(reader)


def parse_info(reply: RespValue) -> dict[str, str]:
    """The ``key:value`` lines of an ``INFO`` reply."""
    if not isinstance(reply, bytes):
        raise RedisError(f"INFO: unexpected reply {reply!r}")
    lines = reply.decode(errors="replace").splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))


def _read_reply(reader: IO[bytes]) -> RespValue:
    """Parse one RESP2 reply from a buffered binary reader."""
    line = reader.readline()
    if not line:
        raise ConnectionError("connection closed by redis-server")
    kind, rest = line[:1], line[1:].rstrip(b"\r\n")
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RedisError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        if count < 0:
            return None
        return [_read_reply(reader) for _ in range(count)]
    raise RedisError(f"unexpected reply line: {line!r}")
