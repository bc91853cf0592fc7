"""The dispatcher: moves pending journal entries to their sink, now and then again with backoff.

An entry is marked delivered only on a confirmed success; a permanent refusal moves it to ``failed`` (a dead
letter to replay); anything else, including an unexpected exception, is a temporary failure retried with capped
exponential backoff, for as long as it takes. Nothing here deletes mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from lmtp_gateway.journal import DamagedEntry, Entry, Journal, State
from lmtp_gateway.metrics import Metrics
from lmtp_gateway.sinks import Delivered, Outcome, Permanent, Sinks, Transient

log = logging.getLogger(__name__)


def backoff_delay(attempts: int, base: float, cap: float, jitter: float = 0.1) -> float:
    """Seconds to wait after the `attempts`-th failure: base·2^(n-1), capped, with a little jitter."""
    delay = min(cap, base * 2 ** max(attempts - 1, 0))
    return delay * (1 + random.uniform(-jitter, jitter))


@dataclass
class DispatchStats:
    """Counts for `collect --once` and the tests (the metrics count for everyone else)."""

    delivered: int = 0
    transient: int = 0


class ByteBudget:
    """Caps the bytes of messages being delivered at once: a Sidekiq job holds a message three or four times over
    (the text, its JSON, the Redis command), so sixteen 10 MB messages at once would need over half a gigabyte.
    A message larger than the whole budget still goes, alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + size <= self.limit)
            self.used += size
        try:
            yield
        finally:
            async with self._changed:
                self.used -= size
                self._changed.notify_all()


class Dispatcher:
    def __init__(
        self,
        journal: Journal,
        sinks: Sinks,
        *,
        workers: int = 16,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
        clock: Callable[[], float] = time.time,
        max_bytes_in_flight: int = 16 * 1024 * 1024,
        metrics: Metrics | None = None,
    ) -> None:
        self.journal = journal
        self.sinks = sinks
        self.workers = workers
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.clock = clock
        self.stats = DispatchStats()
        self.metrics = metrics or Metrics()
        self._budget = ByteBudget(max_bytes_in_flight)
        self._ready: asyncio.Queue[tuple[Entry, bytes | None]] = asyncio.Queue()
        self._retry: list[tuple[float, int, Entry]] = []
        self._sequence = itertools.count()
        self._retry_changed = asyncio.Event()
        # id -> received_at of every entry handed in and not finished: queued, being delivered or waiting
        self._known: dict[str, float] = {}

    # --- feeding ---

    def submit(self, entry: Entry, raw: bytes | None = None) -> None:
        """Deliver `entry` as soon as a worker is free (it is already committed in the journal). `raw` is the
        stored message when the caller still holds it; otherwise it is read from the journal."""
        if entry.id in self._known:
            return  # a Postfix retry of a message still on its way
        self._known[entry.id] = entry.received_at
        self._ready.put_nowait((entry, raw))

    def knows(self, entry_id: str) -> bool:
        """Is the entry handed in and not finished (queued, being delivered or waiting for a retry)?"""
        return entry_id in self._known

    def _schedule(self, entry: Entry, due: float) -> None:
        heapq.heappush(self._retry, (due, next(self._sequence), entry))
        self._retry_changed.set()

    @property
    def backlog(self) -> int:
        return len(self._known)

    def pending(self) -> tuple[int, float | None]:
        """The backlog and when its oldest entry was received (for the metrics, read at scrape time)."""
        return len(self._known), min(self._known.values(), default=None)

    def waiting(self) -> list[Entry]:
        return [entry for _, _, entry in self._retry]

    async def flush(self) -> None:
        """Until every entry handed in so far has had its attempt (retries waiting for later do not count)."""
        await self._ready.join()

    # --- running ---

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for number in range(self.workers):
                group.create_task(self._worker(), name=f"dispatch-{number}")
            group.create_task(self._timer(), name="dispatch-retry-timer")

    async def _timer(self) -> None:
        while True:
            self._retry_changed.clear()
            now = self.clock()
            while self._retry and self._retry[0][0] <= now:
                _, _, entry = heapq.heappop(self._retry)
                self._ready.put_nowait((entry, None))
            timeout = self._retry[0][0] - now if self._retry else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_changed.wait(), timeout)

    async def _worker(self) -> None:
        while True:
            entry, raw = await self._ready.get()
            try:
                async with self._budget.hold(entry.stored_size or entry.size):
                    if raw is None:
                        raw = await self._read(entry)
                    outcome = None if raw is None else await self._attempt(entry, raw)
                    raw = None
                if outcome is None:  # finished meanwhile (a stale rescan), or found damaged and set aside
                    self._done(entry)
                    continue
                await self._record(entry, outcome)
            except OSError as error:  # the journal could not record it: keep the entry, try again later
                log.error("journal: cannot record outcome of %s: %s", entry.id, error)
                self._schedule(entry, self.clock() + self.backoff_cap)
            finally:
                self._ready.task_done()

    async def _read(self, entry: Entry) -> bytes | None:
        """The stored message, checked whole; None when there is nothing to deliver. A damaged entry is set aside
        (quarantine/) rather than delivered as it is or retried for ever."""
        try:
            return await asyncio.to_thread(self.journal.read_message, entry)
        except FileNotFoundError:
            if not self.journal.exists(entry):
                return None  # moved on meanwhile
            problem = "message file missing"
        except DamagedEntry as damage:
            problem = str(damage)
        await asyncio.to_thread(self.journal.set_aside, entry.id, entry.state, problem)
        return None

    async def _attempt(self, entry: Entry, raw: bytes) -> Outcome:
        if entry.mailbox is None:
            return Permanent("entry has no mailbox")
        try:
            sink = self.sinks[entry.mailbox]
        except KeyError:
            return Transient(f"mailbox {entry.mailbox} is not configured any more")
        try:
            return await sink.deliver(entry, raw)
        except Exception as error:  # a sink bug must not lose mail: retry
            log.exception("sink %s raised while delivering %s", sink.name, entry.id)
            return Transient(f"{sink.name}: unexpected {type(error).__name__}")

    async def _record(self, entry: Entry, outcome: Outcome) -> None:
        entry.attempts += 1
        entry.sink = self.sinks[entry.mailbox].name if entry.mailbox in self.sinks.by_mailbox else None
        kind = {Delivered: "delivered", Permanent: "failed", Transient: "deferred"}[type(outcome)]
        timed_out = isinstance(outcome, Transient) and outcome.timed_out
        self.metrics.outcome(entry.mailbox, entry.sink, kind, entry.received_at, timed_out=timed_out)
        match outcome:
            case Delivered(detail):
                entry.last_error = None
                entry.next_attempt_at = None
                await self.journal.move(entry, State.DELIVERED)
                self.stats.delivered += 1
                log.info(
                    "delivered",
                    extra={
                        "event": "delivered",
                        "journal_id": entry.id,
                        "mailbox": entry.mailbox,
                        "key": entry.key,
                        "rcpt": entry.rcpt,
                        "sink": entry.sink,
                        "detail": detail,
                        "latency_ms": round((self.clock() - entry.received_at) * 1000, 1),
                        "attempts": entry.attempts,
                    },
                )
                self._done(entry)
            case Permanent(reason):
                entry.last_error = reason
                entry.next_attempt_at = None
                await self.journal.move(entry, State.FAILED, durable=True)
                log.error(
                    "failed permanently: %s",
                    reason,
                    extra={"event": "failed", "journal_id": entry.id, "mailbox": entry.mailbox, "sink": entry.sink},
                )
                self._done(entry)
            case Transient(reason, _):
                delay = backoff_delay(entry.attempts, self.backoff_base, self.backoff_cap)
                entry.last_error = reason
                entry.next_attempt_at = self.clock() + delay
                await self.journal.update(entry)
                self.stats.transient += 1
                log.warning(
                    "temporary failure, retry in %.1fs: %s",
                    delay,
                    reason,
                    extra={"event": "deferred", "journal_id": entry.id, "mailbox": entry.mailbox, "sink": entry.sink},
                )
                self._schedule(entry, entry.next_attempt_at)

    def _done(self, entry: Entry) -> None:
        self._known.pop(entry.id, None)
