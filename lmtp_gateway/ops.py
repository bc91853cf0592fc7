"""The monitoring listener: ``/metrics`` for Prometheus, ``/livez`` and ``/readyz`` for systemd, load balancers
and Kubernetes-style probes.

A small HTTP/1.1 responder on ``asyncio.start_server``: one request per connection, answered and closed, every
read and write under a deadline so a slow or silent client costs nothing. Hand-written on purpose: the routes
are three GETs, and they must run in the gateway's own event loop (``/readyz`` awaits the sinks' probes, and
``/livez`` is only worth something if the loop that delivers mail is the one answering). prometheus_client's
own server answers from a thread, and aiohttp or an ASGI server would bring a web framework for three routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from lmtp_gateway.listen import Address, Server
from lmtp_gateway.logs import redact_urls
from lmtp_gateway.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0  # for the whole exchange: request head in, response out
MAX_HEAD = 8192
PROBE_TIMEOUT = 3.0
PROBE_CACHE_SECONDS = 5.0
TEXT = "text/plain; charset=utf-8"

Probe = Callable[[], Awaitable[str | None]]


class Readiness:
    """Runs named probes (None = fine, else a one-line reason) and keeps the answer for `ttl` seconds, so a
    scraper polling /readyz every second does not turn into a PING storm on GitLab's Redis."""

    def __init__(
        self,
        probes: list[tuple[str, Probe]],
        *,
        ttl: float = PROBE_CACHE_SECONDS,
        timeout: float = PROBE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probes = probes
        self.ttl = ttl
        self.timeout = timeout
        self.clock = clock
        self._lock = asyncio.Lock()
        self._answer: tuple[float, list[str]] | None = None

    async def problems(self) -> list[str]:
        """What is wrong now, one line each; empty when ready."""
        async with self._lock:  # concurrent requests share one round of probes
            if self._answer is None or self.clock() - self._answer[0] >= self.ttl:
                found = await asyncio.gather(*(self._run(name, probe) for name, probe in self.probes))
                self._answer = (self.clock(), [problem for problem in found if problem])
            return self._answer[1]

    async def _run(self, name: str, probe: Probe) -> str | None:
        try:
            reason = await asyncio.wait_for(probe(), self.timeout)
        except TimeoutError:
            reason = f"no answer within {self.timeout:g}s"
        except Exception as error:  # a probe's bug must read as "not ready", not take the listener down
            log.exception("readiness probe %s raised", name)
            reason = f"probe failed: {type(error).__name__}"
        return redact_urls(f"{name}: {reason}") if reason else None


class OpsServer:
    """/metrics, /livez, /readyz. `ready()` returns what is wrong (empty: ready)."""

    ROUTES = ("/metrics", "/livez", "/readyz")

    def __init__(
        self,
        metrics: Metrics,
        ready: Callable[[], Awaitable[list[str]]],
        *,
        warnings: Callable[[], list[str]] = list,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.warnings = warnings  # worth an admin's look, but no reason to stop sending mail here
        self.timeout = timeout
        self.server: Server | None = None
        self.address: str | None = None

    async def listen(self, spec: str, *, key: str = "monitoring.listen", listener: socket.socket | None = None) -> str:
        """Listen on HOST:PORT (port 0 picks a free one), or on `listener` when bound already; a port that cannot
        be bound is a ListenError naming `key`. Returns the address bound."""
        fix = f"set {key} to a free HOST:PORT, or to off"
        self.server, bound = await Address.parse(spec).serve_streams(
            self._serve, key=key, limit=MAX_HEAD, fix=fix, listener=listener
        )
        self.address = str(bound)
        log.info("monitoring on http://%s/metrics", self.address, extra={"event": "listening", "address": self.address})
        return self.address

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(self._exchange(reader, writer), self.timeout)
        except TimeoutError:  # too slow: a last word without waiting for it to be read, then hang up
            with contextlib.suppress(Exception):
                writer.write(_response(408, b"request timeout\n", {}, TEXT))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # gone: nobody to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await self._send(writer, "HEAD", 431, "request head too large\n")
            return
        except asyncio.IncompleteReadError as error:
            if error.partial.strip():  # something that was not HTTP, then the client stopped sending
                await self._send(writer, "GET", 400, "bad request\n")
            return
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
            await self._send(writer, "GET", 400, "bad request: expected 'GET /metrics HTTP/1.1'\n")
            return
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        if path not in self.ROUTES:
            await self._send(writer, method, 404, "not found; try /metrics, /livez or /readyz\n")
        elif method not in ("GET", "HEAD"):
            await self._send(writer, method, 405, f"{method} not allowed; use GET\n", {"Allow": "GET, HEAD"})
        elif path == "/metrics":
            text = await asyncio.to_thread(self.metrics.render)  # it lists the journal's directories
            await self._send(writer, method, 200, text, content_type=CONTENT_TYPE)
        elif path == "/livez":
            await self._send(writer, method, 200, "ok\n")
        else:
            problems = await self.ready()
            notes = "".join(f"warning: {line}\n" for line in self.warnings())
            if problems:
                await self._send(writer, method, 503, "".join(f"{line}\n" for line in problems) + notes)
            else:
                await self._send(writer, method, 200, "ready\n" + notes)

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter,
        method: str,
        status: int,
        body: str | bytes,
        headers: dict[str, str] | None = None,
        content_type: str = TEXT,
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        response = _response(status, data, headers or {}, content_type)
        writer.write(response[: len(response) - len(data)] if method == "HEAD" else response)
        await writer.drain()


def _response(status: int, data: bytes, headers: dict[str, str], content_type: str) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(data)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
