"""Shared test helpers and fixtures: real Redis, an in-process gateway, a gateway process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmtp_gateway.config import Config, parse_config
from lmtp_gateway.journal import Draft, Entry
from lmtp_gateway.rules import MAILBOX_TYPES, AddressTemplate, RoutingTable
from lmtp_gateway.service import Gateway
from tests.lmtp_client import LmtpClient
from tests.servers import free_port

REPO = Path(__file__).resolve().parent.parent
REPLY_KEY = "59d8df8370b7e95c5a49fbf86aeb2c93"
REPLY_RCPT = f"incoming+{REPLY_KEY}@incoming.test"


def message(*headers: str, body: str = "Hello\n", crlf: bool = False) -> bytes:
    """A raw message built from header lines."""
    eol = "\r\n" if crlf else "\n"
    return (eol.join(headers) + eol + eol + body).encode()


def numbered_message(number: int, rcpt: str = REPLY_RCPT, body: str = "Hello") -> bytes:
    """A distinct message (its Message-ID carries the number) for load tests."""
    return message(
        "From: Alice <alice@example.org>",
        f"To: {rcpt}",
        f"Subject: message {number}",
        f"Message-ID: <msg-{number}@example.org>",
        body=f"{body} {number}\n",
    )


def routing_table(host: str, addresses: dict[str, str], custom_emails: dict[str, str] | None = None) -> RoutingTable:
    """GitLab's host and mailbox addresses, in GitLab's order, as the configuration makes them."""
    mailboxes = tuple((name, AddressTemplate.parse(addresses[name])) for name in MAILBOX_TYPES if name in addresses)
    return RoutingTable(host, mailboxes, custom_emails or {})


@pytest.fixture
def table() -> RoutingTable:
    return routing_table(
        "gitlab.example.com",
        {
            "incoming_email": "incoming+%{key}@incoming.example.com",
            "service_desk_email": "contact+%{key}@incoming.example.com",
        },
    )


def gateway_yaml(spool_path: Path, /, **sections: Any) -> dict[str, Any]:
    """A gateway configuration for tests: both mailboxes on incoming.test, maildir unless told otherwise."""
    data: dict[str, Any] = {
        "gitlab": {"host": "gitlab.test"},
        "incoming_email": {"address": "incoming+%{key}@incoming.test", "delivery_method": "maildir"},
        "service_desk_email": {"address": "contact+%{key}@incoming.test", "delivery_method": "maildir"},
        "lmtp": {"listen": "127.0.0.1:0", "workers": 1},  # tests of `serve --workers` ask for more
        "spool": {"path": str(spool_path)},
        "monitoring": {"listen": "off", "collect_listen": "off"},  # tests wanting /metrics ask for 127.0.0.1:0
    }
    for name, values in sections.items():
        if values is None:
            data.pop(name, None)
        else:
            data[name] = {**data.get(name, {}), **values}
    return data


def make_config(spool_path: Path, /, **sections: Any) -> Config:
    return parse_config(yaml.safe_dump(gateway_yaml(spool_path, **sections)), "test.yml")


def draft(entry: Entry, prefix: bytes, body: bytes | Path) -> Draft:
    """A copy to commit, as intake makes it (the digest of a vanished file is of nothing)."""
    content = body if isinstance(body, bytes) else body.read_bytes() if body.exists() else b""
    return Draft(entry, prefix, body, hashlib.sha256(content).digest())


def mailroom_secret_file(directory: Path, key: bytes, mode: int = 0o600) -> Path:
    """GitLab's .gitlab_mailroom_secret: the webhook's JWT key, base64-encoded."""
    path = directory / ".gitlab_mailroom_secret"
    path.write_bytes(base64.b64encode(key) + b"\n")
    path.chmod(mode)
    return path


def tmp_leftovers(spool: Path) -> list[Path]:
    """Whatever a message left in the journal's tmp/."""
    return list((spool / "tmp").iterdir())


async def eventually(
    condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition", interval: float = 0.02
) -> Any:
    """Poll a condition that has no event to await (files appearing, another process's state); a costly one
    (a directory of 200 000 names) with a longer `interval`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def finishes_within(seconds: float, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`function`'s result, computed in a thread; a failure if it has not returned after `seconds`. A guard
    against a hang, generous on purpose (CI shares its machine), never a measure of speed."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, function(*args, **kwargs)))
        except BaseException as error:  # handed to the test below
            outcome.append((False, error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"{getattr(function, '__name__', function)} still running after {seconds}s"
    finished, value = outcome[0]
    if not finished:
        raise value
    return value


class RunningGateway:
    """A Gateway running in this event loop, for tests that look inside or inject faults."""

    def __init__(self, gateway: Gateway, task: asyncio.Task[None]) -> None:
        self.gateway = gateway
        self.task = task

    @property
    def address(self) -> str:
        return self.gateway.lmtp.addresses[0]

    async def client(self) -> LmtpClient:
        client = await LmtpClient.connect(self.address)
        await client.lhlo()
        return client

    async def stop(self) -> None:
        self.gateway.request_stop()
        await asyncio.wait_for(self.task, 30)


StartGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    running: list[RunningGateway] = []

    async def start(config: Config | None = None, **gateway_options: Any) -> RunningGateway:
        gateway = Gateway(config or make_config(tmp_path / "spool"), **gateway_options)
        task = asyncio.create_task(gateway.run(install_signals=False))
        started = asyncio.create_task(gateway.started.wait())
        await asyncio.wait({task, started}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            started.cancel()
            task.result()  # raises the start-up error
        assert gateway.started.is_set(), "gateway did not start"
        running.append(RunningGateway(gateway, task))
        return running[-1]

    yield start
    for item in running:
        if not item.task.done():
            await item.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs for the journal: a real full disk (or, remounted read-only, a real read-only one)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mountpoint)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def remount(mountpoint: Path, mode: str) -> None:
    """`ro` or `rw`: read-only stops root too, where chmod does not."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mountpoint)], check=True, capture_output=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    from tests.servers.redis import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis(redis_server: Any) -> Any:
    """The session's Redis, emptied for this test (and running, even if an earlier test stopped it)."""
    if not redis_server.running:
        redis_server.start()
    redis_server.command("FLUSHALL")
    return redis_server


def lmtp_gateway_command() -> list[str]:
    script = Path(sys.executable).parent / "lmtp-gateway"
    return [str(script)] if script.exists() else [shutil.which("lmtp-gateway") or "lmtp-gateway"]


class GatewayProcess:
    """`lmtp-gateway serve` as a separate process: for signals, kill -9 and memory."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> GatewayProcess:
        data = yaml.safe_load(self.config_path.read_text())
        self.port = self.port or free_port()
        data["lmtp"]["listen"] = f"127.0.0.1:{self.port}"
        self.config_path.write_text(yaml.safe_dump(data))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*lmtp_gateway_command(), "serve", "--config", str(self.config_path), "--log-json"],
                stdout=log,
                stderr=log,
            )
        try:
            self._wait_for_greeting()
        except BaseException:
            self.kill()  # never leave a half-started gateway behind
            raise
        return self

    def _wait_for_greeting(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            with contextlib.suppress(OSError):
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as probe:
                    if probe.recv(100).startswith(b"220"):
                        return
            time.sleep(0.02)
        raise AssertionError(f"gateway did not answer on port {self.port}:\n{self.log_path.read_text()}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def workers(self) -> list[int]:
        """The pids of the supervisor's worker processes (none with one worker: it is the process itself)."""
        assert self.process is not None
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = stat.read_text().rpartition(")")[2].split()
                if int(fields[1]) == self.process.pid:
                    found.append(int(stat.parent.name))
        return sorted(found)

    def peak_rss_mb(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(**sections: Any) -> GatewayProcess:
        config_path = tmp_path / f"gw{len(started)}.yml"
        config_path.write_text(yaml.safe_dump(gateway_yaml(tmp_path / "spool", **sections)))
        started.append(GatewayProcess(config_path, tmp_path / "gateway.log").start())
        return started[-1]

    yield start
    for process in started:
        process.kill()


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"
