"""The running daemon: wires journal, sinks, dispatcher, intake, the LMTP listeners and the monitoring listener;
its background tasks run under one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

from lmtp_gateway.collect import MailboxCollector, build_collectors, describe
from lmtp_gateway.config import Config
from lmtp_gateway.dispatch import Dispatcher
from lmtp_gateway.ingress import LmtpServer
from lmtp_gateway.intake import Intake
from lmtp_gateway.journal import Journal
from lmtp_gateway.journal.shards import shard_root
from lmtp_gateway.metrics import Metrics
from lmtp_gateway.ops import PROBE_CACHE_SECONDS, OpsServer, Readiness
from lmtp_gateway.sinks import Sinks, build_sinks
from lmtp_gateway.workers import Seat

log = logging.getLogger(__name__)

RETENTION_SWEEP_SECONDS = 3600.0
FLUSH_SECONDS = 10.0


class _Stopped(Exception):
    """Raised inside the TaskGroup to end it once shutdown is complete."""


@dataclass
class OnceReport:
    """What `collect --once` did."""

    collected: dict[str, int]
    errors: dict[str, str]
    delivered: int
    pending: int  # left in the journal for the next run (the sink failed)


class Gateway:
    """Everything `serve` and `collect` run: the LMTP listeners and/or the collectors in front of one journal,
    dispatcher and set of sinks. Built from a Config; `run()` returns after a graceful stop."""

    def __init__(
        self,
        config: Config,
        *,
        sinks: Sinks | None = None,
        backoff_base: float = 1.0,
        listen: bool = True,
        collect: bool = False,
        only_mailbox: str | None = None,
        probe_cache_seconds: float = PROBE_CACHE_SECONDS,
        seat: Seat | None = None,
    ) -> None:
        self.config = config
        self.seat = seat
        spool = config.spool.path
        root = shard_root(spool, seat.index) if seat else spool
        self.journal = Journal(root, sync=config.spool.sync)
        self.sinks = sinks if sinks is not None else build_sinks(config)
        self.metrics = Metrics()
        self.dispatcher = Dispatcher(self.journal, self.sinks, backoff_base=backoff_base, metrics=self.metrics)
        others = [Journal(shard_root(spool, i)) for i in range(seat.count) if i != seat.index] if seat else []
        self.intake = Intake(
            config.routing,
            self.journal,
            self.dispatcher,
            self.metrics,
            siblings=others,
            retry_horizon=config.spool.retention,
        )
        self.metrics.watch_backlog(self.dispatcher.pending)
        self.metrics.active.set_function(lambda: self.dispatcher.active)
        self.metrics.watch_quarantine(lambda: len(self.journal.quarantined()))
        for name, sink in self.sinks.by_mailbox.items():
            self.metrics.declare(name, sink.name)
        probes = [(f"{name} ({sink.name})", sink.probe) for name, sink in self.sinks.by_mailbox.items()]
        probes.append(("journal", self._probe_journal))
        self.readiness = Readiness(probes, ttl=probe_cache_seconds)
        self.ops = OpsServer(self.metrics, self.health, warnings=self.warnings)
        self.lmtp = LmtpServer(
            config.routing,
            self.intake,
            max_message_size=config.lmtp.max_message_size,
            max_recipients=config.lmtp.max_recipients,
            max_transaction_bytes=config.lmtp.max_transaction_bytes,
            hostname=config.lmtp.hostname,
        )
        self.listening = listen
        self.collectors: list[MailboxCollector] = (
            build_collectors(
                config, self.intake, self.sinks, config.spool.path / "collectors", only_mailbox, self.metrics
            )
            if collect
            else []
        )
        self.stop_requested = asyncio.Event()
        self.started = asyncio.Event()

    @property
    def _monitoring_listen(self) -> tuple[str, str]:
        """serve and collect may run side by side on one host: each has its own monitoring port."""
        if self.listening:
            return "monitoring.listen", self.config.monitoring.listen
        return "monitoring.collect_listen", self.config.monitoring.collect_listen

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def health(self) -> list[str]:
        """What keeps the gateway from taking and delivering mail now (/readyz); empty when ready."""
        if self.stop_requested.is_set():
            return ["stopping"]
        if not self.started.is_set():
            return ["starting: recovering the journal"]
        collecting = [
            f"collector {c.mailbox}: {c.status.last_error}"
            for c in self.collectors
            if c.status.state == "backoff" and c.status.last_error
        ]
        return collecting + await self.readiness.problems()

    def warnings(self) -> list[str]:
        """What /readyz mentions while still answering ready: damaged entries set aside."""
        count = len(self.journal.quarantined())
        if not count:
            return []
        return [f"{count} damaged journal entries set aside in {self.journal.quarantine} (spool list --quarantined)"]

    async def _probe_journal(self) -> str | None:
        # A message of the largest size allowed must still fit.
        return await asyncio.to_thread(self.journal.probe, self.config.lmtp.max_message_size)

    async def run(self, *, install_signals: bool = True, on_ready: Callable[[Gateway], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            # first: /livez answers during a long recovery, and a busy port fails fast
            key, spec = self._monitoring_listen
            if self.seat is not None:  # the supervisor's sockets: it serves /metrics for all the workers
                await self.ops.listen("127.0.0.1:0", key=key, listener=self.seat.monitoring)
            elif spec:
                await self.ops.listen(spec, key=key)
            await self._open_journal()
            listeners = self.seat.lmtp if self.seat else (None,) * len(self.config.lmtp.listen)
            for spec, listener in zip(self.config.lmtp.listen if self.listening else (), listeners, strict=False):
                await self.lmtp.listen(
                    spec,
                    socket_mode=self.config.lmtp.socket_mode,
                    socket_group=self.config.lmtp.socket_group,
                    listener=listener,
                )
            self.started.set()
            if on_ready:
                on_ready(self)
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self.dispatcher.run(), name="dispatcher")
                    group.create_task(self._sweep_retention(), name="retention")
                    running = [group.create_task(c.run(), name=f"collect-{c.mailbox}") for c in self.collectors]
                    group.create_task(self._stop_when_asked(running), name="shutdown")
            except* _Stopped:
                pass
        finally:
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            await self.ops.close()
            await self.sinks.close()
            self.journal.close()
        log.info("stopped", extra={"event": "stopped"})

    async def _open_journal(self) -> None:
        """Recovery; the dispatcher then reads what waits, a window at a time."""
        waiting = await asyncio.to_thread(self.journal.open)
        if waiting:
            log.info("%d entries wait for delivery in the journal", waiting, extra={"event": "recovered"})

    async def _stop_when_asked(self, collectors: list[asyncio.Task[None]]) -> None:
        await self.stop_requested.wait()
        log.info("stopping: no new connections, finishing transactions", extra={"event": "stopping"})
        for collector in self.collectors:
            collector.stop()  # each finishes the batch in hand: fetched messages are committed and settled
        if self.listening:
            await self.lmtp.shutdown()
        if collectors:
            await asyncio.wait(collectors, timeout=FLUSH_SECONDS)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.dispatcher.flush(), FLUSH_SECONDS)
        waiting = self.dispatcher.backlog
        if waiting:
            log.info("%d entries stay pending in the journal for the next start", waiting, extra={"event": "stopping"})
        raise _Stopped

    async def collect_once(self) -> OnceReport:
        """`collect --once`: drain every mailbox, give each pending entry its delivery attempt, stop."""
        report = OnceReport({}, {}, 0, 0)
        try:
            await self._open_journal()
            async with asyncio.TaskGroup() as group:
                dispatching = group.create_task(self.dispatcher.run(), name="dispatcher")
                results = await asyncio.gather(*(c.once() for c in self.collectors), return_exceptions=True)
                await self.dispatcher.flush()
                dispatching.cancel()
            for collector, result in zip(self.collectors, results, strict=True):
                if isinstance(result, BaseException):
                    report.errors[collector.mailbox] = describe(result)
                report.collected[collector.mailbox] = collector.status.collected
            report.delivered = self.dispatcher.stats.delivered
            report.pending = self.dispatcher.backlog
        finally:
            await self.sinks.close()
            self.journal.close()
        return report

    async def _sweep_retention(self) -> None:
        while True:
            removed = await asyncio.to_thread(self.journal.expire, self.config.spool.retention)
            if removed:
                log.info("retention: removed %d finished entries", removed, extra={"event": "retention"})
            await asyncio.sleep(RETENTION_SWEEP_SECONDS)
