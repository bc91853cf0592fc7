"""``serve --workers N``: one supervisor and N worker processes, as Postfix's master(8) runs its daemons.

The supervisor binds the LMTP listeners once and hands the same sockets to every worker, TCP and UNIX alike: the
kernel gives each new connection to one of the processes waiting in accept(). Each worker is a whole gateway
(intake, journal, dispatcher) with a journal shard of its own (``journal.shards``), so every journal keeps a
single writer, and looks into the other shards to recognise a Postfix retry that reaches it instead of the worker
that took the message first.

The supervisor restarts a worker that dies, stops them all on SIGTERM (each finishes the transactions in DATA,
as a single process does), and answers /metrics (the workers' figures added up) and /readyz (every worker's
problems) on ``monitoring.listen``. A worker dies with its supervisor (PR_SET_PDEATHSIG): a killed supervisor
never leaves workers holding the sockets and the journals.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from lmtp_gateway.config import Config
from lmtp_gateway.journal import Journal
from lmtp_gateway.journal.shards import merge_orphans, shard_root
from lmtp_gateway.listen import Address
from lmtp_gateway.metrics import PREFIX
from lmtp_gateway.ops import OpsServer

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0  # after a worker died; doubled while it keeps dying young, up to RESTART_DELAY_CAP
RESTART_DELAY_CAP = 30.0
YOUNG = 30.0  # a worker that dies sooner than this after its start counts as dying young
STOP_SECONDS = 60.0  # for the workers to finish after SIGTERM before they are killed
SCRAPE_SECONDS = 5.0  # for a worker's /metrics or /readyz
PR_SET_PDEATHSIG = 1
# Gauges whose workers' values are not added up.
LARGEST = frozenset({f"{PREFIX}_journal_oldest_pending_age_seconds"})


@dataclass(frozen=True)
class Seat:
    """What a worker gets from its supervisor: its index, the listening sockets, where to say it is ready."""

    index: int
    count: int
    parent: int
    lmtp: tuple[socket.socket, ...]
    monitoring: socket.socket
    ready_fd: int

    def argument(self) -> str:
        """For the worker's command line (``serve --worker-seat``); the descriptors are inherited."""
        return json.dumps(
            {
                "index": self.index,
                "count": self.count,
                "parent": self.parent,
                "lmtp": [s.fileno() for s in self.lmtp],
                "monitoring": self.monitoring.fileno(),
                "ready": self.ready_fd,
            }
        )

    @classmethod
    def from_argument(cls, text: str) -> Seat:
        data = json.loads(text)
        return cls(
            index=data["index"],
            count=data["count"],
            parent=data["parent"],
            lmtp=tuple(socket.socket(fileno=fd) for fd in data["lmtp"]),
            monitoring=socket.socket(fileno=data["monitoring"]),
            ready_fd=data["ready"],
        )

    def descriptors(self) -> list[int]:
        return [*(s.fileno() for s in self.lmtp), self.monitoring.fileno(), self.ready_fd]

    def report_ready(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"ready\n")
            os.close(self.ready_fd)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its supervisor dies, however it dies (prctl(2), Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


@dataclass
class Worker:
    index: int
    monitoring: socket.socket  # kept across restarts: the supervisor always knows where to scrape
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    ready: bool = False
    restarts: int = 0
    delay: float = RESTART_DELAY
    last_exit: str = ""

    @property
    def port(self) -> int:
        return int(self.monitoring.getsockname()[1])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


@dataclass
class Supervisor:
    config: Config
    count: int
    command: list[str]  # a worker's command line, without --worker-seat
    workers: list[Worker] = field(default_factory=list)
    stopping: bool = False

    def __post_init__(self) -> None:
        self.registry, self.restarts = supervisor_metrics(self.count, lambda: sum(w.running for w in self.workers))
        self.ops = OpsServer(self, self.problems, warnings=lambda: self._warnings)  # type: ignore[arg-type]
        self._warnings: list[str] = []
        self._stop = asyncio.Event()
        self.lmtp_listeners: list[tuple[str, socket.socket]] = []

    # --- running ---

    async def run(self, on_ready: Callable[[Supervisor], None] | None = None) -> int:
        """Until SIGTERM or SIGINT; 0 when every worker stopped cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            if self.config.monitoring.listen:
                await self.ops.listen(self.config.monitoring.listen)
            self._claim_shards()
            await merge_orphans(self.config.spool.path, self.count, sync=self.config.spool.sync)
            lmtp = self.config.lmtp
            for spec in lmtp.listen:
                listener = Address.parse(spec).bind(
                    key="lmtp.listen", socket_mode=lmtp.socket_mode, socket_group=lmtp.socket_group
                )
                self.lmtp_listeners.append((spec, listener))
            self.workers = [Worker(i, Address().bind(key="worker monitoring")) for i in range(self.count)]
            if not await self._start_all():
                return 1
            if on_ready:
                on_ready(self)
            async with asyncio.TaskGroup() as group:
                for worker in self.workers:
                    group.create_task(self._watch(worker), name=f"worker-{worker.index}")
                await self._stop.wait()
                self.stopping = True
                log.info("stopping: the workers finish their transactions", extra={"event": "stopping"})
                await self._stop_all()
            # A worker still starting when SIGTERM came dies of it: it had taken nothing yet.
            clean = (0, -signal.SIGTERM)
            return 0 if all(w.process and w.process.returncode in clean for w in self.workers) else 1
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for worker in self.workers:
                if worker.running and worker.process is not None:
                    worker.process.kill()
                worker.monitoring.close()
            for spec, listener in self.lmtp_listeners:
                listener.close()
                Address.parse(spec).remove()
            await self.ops.close()
            log.info("stopped", extra={"event": "stopped"})

    def _claim_shards(self) -> None:
        """Refuse at once, with the journal's own words, when another gateway runs on this spool."""
        for index in range(self.count):
            journal = Journal(shard_root(self.config.spool.path, index))
            journal.ensure_layout()
            journal.open()
            journal.close()

    async def _start_all(self) -> bool:
        """Start every worker and wait until each is ready; False (all stopped) when one dies before."""
        started = await asyncio.gather(*(self._start(worker) for worker in self.workers))
        if all(started):
            return True
        for worker in self.workers:
            if worker.running and worker.process is not None:
                worker.process.terminate()
                await worker.process.wait()
        return False

    async def _start(self, worker: Worker) -> bool:
        """Spawn `worker`; True once it said it is ready, False if it died first."""
        read_end, write_end = os.pipe()
        listeners = tuple(listener for _, listener in self.lmtp_listeners)
        seat = Seat(worker.index, self.count, os.getpid(), listeners, worker.monitoring, write_end)
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *self.command,
                "--worker-seat",
                seat.argument(),
                pass_fds=seat.descriptors(),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            os.close(write_end)
        worker.started_at, worker.ready = time.monotonic(), False
        said = await asyncio.to_thread(_read_all, read_end)
        worker.ready = said.startswith(b"ready")
        if worker.ready:
            log.info("worker %d ready (pid %d)", worker.index, worker.process.pid,
                     extra={"event": "worker_ready", "worker": worker.index})  # fmt: skip
        return worker.ready

    async def _watch(self, worker: Worker) -> None:
        """Restart `worker` whenever it dies, until the supervisor stops."""
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            worker.ready = False
            worker.last_exit = _exit_text(code)
            if self.stopping:
                return
            young = time.monotonic() - worker.started_at < YOUNG
            worker.delay = min(RESTART_DELAY_CAP, worker.delay * 2) if young else RESTART_DELAY
            log.error(
                "worker %d %s; restarting in %.0f s", worker.index, worker.last_exit, worker.delay,
                extra={"event": "worker_died", "worker": worker.index},
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), worker.delay)
            if self.stopping or self._stop.is_set():
                return
            worker.restarts += 1
            self.restarts.inc()
            await self._start(worker)

    async def _stop_all(self) -> None:
        running = [w.process for w in self.workers if w.running and w.process is not None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        if running:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running], timeout=STOP_SECONDS)
        for process in running:
            if process.returncode is None:
                log.error("worker pid %d did not stop in %.0f s: killed", process.pid, STOP_SECONDS)
                process.kill()
                await process.wait()

    # --- /metrics and /readyz for all ---

    def render(self) -> bytes:
        """Every worker's /metrics added up, and the supervisor's own (runs in the ops server's thread)."""
        texts = [generate_latest(self.registry).decode()]
        for worker in self.workers:
            if worker.ready:
                with contextlib.suppress(OSError):
                    texts.append(_get(worker.port, "/metrics")[1])
        return merge_metrics(texts)

    async def problems(self) -> list[str]:
        """What keeps mail from flowing through some worker (/readyz): one line each; warnings kept aside."""
        found: list[str] = []
        warnings: list[str] = []
        answers = await asyncio.gather(*(self._readiness(w) for w in self.workers))
        for worker, (status, text) in zip(self.workers, answers, strict=True):
            lines = [line for line in text.splitlines() if line and line != "ready"]
            for line in lines:
                if line.startswith("warning: "):
                    warnings.append(f"worker {worker.index}: {line.removeprefix('warning: ')}")
                elif status != 200:
                    found.append(f"worker {worker.index}: {line}")
        self._warnings = sorted(set(warnings))
        return ["stopping"] if self.stopping else found

    async def _readiness(self, worker: Worker) -> tuple[int, str]:
        if not worker.running:
            return 503, f"not running ({worker.last_exit or 'starting'})"
        if not worker.ready:
            return 503, "starting"
        try:
            return await asyncio.to_thread(_get, worker.port, "/readyz")
        except OSError as error:
            return 503, f"no answer on its monitoring port: {error}"


def supervisor_metrics(count: int, running: Callable[[], int]) -> tuple[CollectorRegistry, Counter]:
    """The supervisor's own series, beside its workers' (returned: the registry, and the restart counter)."""
    registry = CollectorRegistry(auto_describe=True)
    Gauge(f"{PREFIX}_workers", "Worker processes configured (lmtp.workers).", registry=registry).set(count)
    Gauge(f"{PREFIX}_workers_running", "Worker processes running now.", registry=registry).set_function(running)
    restarts = Counter(f"{PREFIX}_worker_restarts", "Worker processes restarted after they died.", registry=registry)
    return registry, restarts


def merge_metrics(texts: Iterable[str]) -> bytes:
    """Prometheus text from several processes as one: counters, histograms and most gauges added up per series;
    the ages in LARGEST take the largest; the `_created` times the earliest."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            series = values.setdefault(merged.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in series:
                    series[key] = sample.value
                elif sample.name.endswith("_created"):
                    series[key] = min(series[key], sample.value)
                elif sample.name in LARGEST:
                    series[key] = max(series[key], sample.value)
                else:
                    series[key] += sample.value
    registry = CollectorRegistry(auto_describe=False)

    class Merged:
        def collect(self) -> Iterable[Metric]:
            for name, family in families.items():
                for (sample_name, labels), value in values[name].items():
                    family.add_sample(sample_name, dict(labels), value)
                yield family

    registry.register(Merged())  # type: ignore[arg-type]
    return generate_latest(registry)


def _get(port: int, path: str) -> tuple[int, str]:
    """A GET to a worker's monitoring listener on loopback; its status even when it is not 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=SCRAPE_SECONDS) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _read_all(descriptor: int) -> bytes:
    """What a worker writes on its readiness pipe, until it closes it (by writing, or by dying)."""
    chunks = []
    try:
        while chunk := os.read(descriptor, 64):
            chunks.append(chunk)
            if b"\n" in chunk:
                break
    finally:
        os.close(descriptor)
    return b"".join(chunks)


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"
