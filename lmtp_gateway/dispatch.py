"""The dispatcher: moves waiting journal entries to their sink, now and then again with backoff.

An entry is marked delivered only on a confirmed success; a permanent refusal moves it to ``failed`` (a dead
letter to replay); anything else, including an unexpected exception, is a temporary failure: the entry goes to
``deferred/`` with the time of its next attempt (capped exponential backoff), for as long as it takes. Nothing
here deletes mail.

As Postfix's queue manager does, the dispatcher holds only an *active window* of entries in memory: what
arrives while the window is full waits in ``pending/``, and a deferred entry leaves memory until its retry is
due. The refill loop reads both back as room frees up, so memory stays bounded through an outage of any length
(a GitLab Redis down for a day leaves hundreds of thousands of entries on disk, and a few thousand in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from lmtp_gateway.journal import WAITING, DamagedEntry, Entry, Journal, State
from lmtp_gateway.metrics import Metrics
from lmtp_gateway.sinks import Delivered, Outcome, Permanent, Sinks, Transient

log = logging.getLogger(__name__)

ACTIVE_WINDOW = 5000  # entries in memory at most (Postfix's qmgr_message_active_limit is 20 000, for smaller ones)
RESCAN_SECONDS = 60.0  # look at pending/ for entries another process (replay, a collector) left there
MIN_DEFERRED_SCAN_SECONDS = 1.0  # between two scans of deferred/, however many retries fall due in between
CANARY_SECONDS = 5.0  # while a mailbox fails, it is really tried this often (the earliest deferred entry goes);
# never more often than 5 backoff steps apart (a small backoff_base, as in tests, tries sooner)
SUSPENDED = "delivery temporarily suspended"
SUSPEND_AFTER = 3  # real attempts failed in a row before a mailbox counts as failing (one bad message does not)
READ_INLINE = 32 * 1024  # a stored message this small is read on the event loop: cheaper than a thread round trip


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


class _Cursor:
    """A listing of one state directory, read on from refill to refill: a long directory is read once per pass,
    not once per refill (ext4 never shrinks a directory: a fresh listing reads every block it ever had). Names
    that come and go meanwhile may be missed or seen twice; the next pass, or the due-time scan, finds them."""

    def __init__(self, journal: Journal, state: State) -> None:
        self.journal = journal
        self.state = state
        self._names: Iterator[str] | None = None

    def take(self, limit: int, skip: Callable[[str], bool]) -> tuple[list[str], bool]:
        """Up to `limit` ids that `skip` does not rule out, and whether the listing goes on (in a thread)."""
        names = self._names if self._names is not None else self.journal.iter_ids(self.state)
        found: list[str] = []
        for entry_id in names:
            if skip(entry_id):
                continue
            found.append(entry_id)
            if len(found) >= limit:
                self._names = names
                return found, True
        self._names = None
        return found, False


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
        window: int | None = None,
        refill: bool = True,
        rescan_seconds: float | None = None,
        min_deferred_scan: float = MIN_DEFERRED_SCAN_SECONDS,
    ) -> None:
        self.journal = journal
        self.sinks = sinks
        self.workers = workers
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.clock = clock
        self.stats = DispatchStats()
        self.metrics = metrics or Metrics()
        self.window = ACTIVE_WINDOW if window is None else window
        # The journal's owner reads entries back from disk; `replay` delivers only what it hands in itself.
        self.refill = refill
        self.rescan_seconds = RESCAN_SECONDS if rescan_seconds is None else rescan_seconds
        self.min_deferred_scan = min(min_deferred_scan, backoff_base)
        self._deferred_gap = self.min_deferred_scan
        self.canary_seconds = min(CANARY_SECONDS, 5 * backoff_base)
        self._budget = ByteBudget(max_bytes_in_flight)
        self._ready: asyncio.Queue[tuple[Entry, bytes | None]] = asyncio.Queue()
        # The active window: id -> received_at of every entry handed in and not finished or deferred.
        self._known: dict[str, float] = {}
        self._spilled = True  # pending/ may hold entries that are not in the window (at start: all of them)
        self._next_due: float | None = 0.0  # when a deferred entry falls due; None: nothing deferred
        self._wake = asyncio.Event()
        self._pending, self._deferred = _Cursor(journal, State.PENDING), _Cursor(journal, State.DEFERRED)
        self._filled = asyncio.Event()  # the first refill is done: what waited at start is in the window
        # Mailboxes failing for the time being: when one was last really tried, and why it failed. While
        # failing, a mailbox gets one real attempt per CANARY_SECONDS; its other entries are deferred
        # untried ("delivery temporarily suspended", as Postfix says of a dead destination): no connection
        # attempt and no read for each of a hundred thousand entries while Redis is down.
        self._failing: dict[str, tuple[float, str]] = {}
        self._streak: dict[str, int] = {}  # real attempts failed in a row, per mailbox
        self._retry_all = False  # one of them answered again: every deferred entry is due

    # --- feeding ---

    def submit(self, entry: Entry, raw: bytes | None = None) -> None:
        """Deliver `entry` as soon as a worker is free (it is already committed in the journal). `raw` is the
        stored message when the caller still holds it; otherwise it is read from the journal. With the window
        full, the entry waits in pending/ and the refill loop reads it back later."""
        if entry.id in self._known:
            return  # a Postfix retry of a message still on its way
        if len(self._known) >= self.window:
            self._spilled = True
            return
        self._known[entry.id] = entry.received_at
        self._ready.put_nowait((entry, raw))

    def knows(self, entry_id: str) -> bool:
        """Is the entry in the active window (queued or being delivered)?"""
        return entry_id in self._known

    @property
    def active(self) -> int:
        """Entries in memory now: the window's occupancy."""
        return len(self._known)

    @property
    def backlog(self) -> int:
        """Entries waiting for delivery, in memory or not (pending and deferred in the journal)."""
        return self.journal.count(*WAITING)

    def pending(self) -> tuple[int, float | None]:
        """The backlog and when its oldest entry arrived, from the journal (for the metrics, read at scrape
        time in the scraper's thread)."""
        return self.journal.waiting()

    async def flush(self) -> None:
        """Until every entry in the window has had its attempt (deferred ones do not count); with `refill`, after
        the window was first filled from the journal."""
        if self.refill:
            await self._filled.wait()
        await self._ready.join()

    # --- running ---

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for number in range(self.workers):
                group.create_task(self._worker(), name=f"dispatch-{number}")
            if self.refill:
                group.create_task(self._refill(), name="dispatch-refill")

    async def _refill(self) -> None:
        """Fill the window from the journal: deferred entries as they fall due, then pending ones it could not
        take when they came (or that another process left), oldest retries first."""
        last_rescan = -math.inf
        last_deferred_scan = -math.inf
        last_canary = time.monotonic()
        while True:
            self._wake.clear()
            now, monotonic = self.clock(), time.monotonic()
            if self._failing and self._room() and monotonic - last_canary >= self.canary_seconds:
                # One attempt tells whether a sink is back: on success, everything deferred goes (below).
                last_canary = monotonic
                first, _ = await asyncio.to_thread(self.journal.due, math.inf, 1)
                self._admit(await asyncio.to_thread(self.journal.load_all, State.DEFERRED, first))
            if self._retry_all and self._worth_refilling():
                # A sink answers again after failing: what waits for it goes now, not at its backoff's end.
                due, more = await asyncio.to_thread(self._deferred.take, self._room(), self._in_hand)  # no times
                if not more:
                    self._retry_all, self._next_due = False, 0.0  # all taken: back to due times
                self._admit(await asyncio.to_thread(self.journal.load_all, State.DEFERRED, due))
            deferred_due = self._next_due is not None and self._next_due <= now
            if deferred_due and self._worth_refilling() and monotonic - last_deferred_scan >= self._deferred_gap:
                last_deferred_scan = monotonic
                due, self._next_due = await asyncio.to_thread(self.journal.due, now, self._room())
                # A long deferred queue is scanned less often: never more than a tenth of the time.
                self._deferred_gap = max(self.min_deferred_scan, 10 * (time.monotonic() - monotonic))
                self._admit(await asyncio.to_thread(self.journal.load_all, State.DEFERRED, due))
            rescan_due = monotonic - last_rescan >= self.rescan_seconds
            if (self._spilled and self._worth_refilling()) or (rescan_due and self._room()):
                last_rescan, self._spilled = monotonic, False  # a submit during the scan spills again
                # A commit under way has its files in pending/ before they are durable (and before its 250).
                unknown, more = await asyncio.to_thread(self._pending.take, self._room(), self._in_hand)
                self._spilled = self._spilled or more
                self._admit(await asyncio.to_thread(self.journal.load_all, State.PENDING, unknown))
            self._filled.set()
            await self._sleep(last_rescan, last_deferred_scan, last_canary)

    async def _sleep(self, last_rescan: float, last_deferred_scan: float, last_canary: float) -> None:
        """Until room frees up for entries that wait, a retry falls due, the next canary or the next rescan."""
        now, monotonic = self.clock(), time.monotonic()
        wake_at = [last_rescan + self.rescan_seconds - monotonic]
        if self._failing:
            wake_at.append(last_canary + self.canary_seconds - monotonic)
        if self._next_due is not None:
            wake_at.append(max(self._next_due - now, last_deferred_scan + self._deferred_gap - monotonic))
        if (self._spilled or self._retry_all) and self._worth_refilling():
            wake_at.append(0.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.0, min(wake_at)))

    def _in_hand(self, entry_id: str) -> bool:
        """In the window already, or a commit under way (called from the scanning thread: reads only)."""
        return entry_id in self._known or self.journal.committing(entry_id)

    def _room(self) -> int:
        return max(0, self.window - len(self._known))

    def _worth_refilling(self) -> bool:
        """Room for a tenth of the window: each refill lists a directory that may hold hundreds of thousands of
        names, so it is done for many entries at once, never for each one that leaves."""
        return self._room() >= max(1, self.window // 10)

    def _admit(self, entries: list[Entry]) -> None:
        """Into the window, as far as it has room now (new mail may have taken some since the scan): what does not
        fit stays on disk, and the next scan finds it."""
        for entry in entries:
            if entry.id in self._known:
                continue
            if not self._room():
                if entry.state is State.PENDING:
                    self._spilled = True
                else:
                    self._next_due = min(self._next_due or 0.0, entry.next_attempt_at or 0.0)
                continue
            self._known[entry.id] = entry.received_at
            self._ready.put_nowait((entry, None))

    def _deferred_until(self, due: float) -> None:
        if self._next_due is None or due < self._next_due:
            self._next_due = due
            self._wake.set()

    async def _worker(self) -> None:
        while True:
            entry, raw = await self._ready.get()
            try:
                if self._suspended(entry):
                    await self._set_aside_untried(entry)
                    continue
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
                asyncio.get_running_loop().call_later(self.backoff_cap, self._ready.put_nowait, (entry, None))
            finally:
                self._ready.task_done()

    async def _set_aside_untried(self, entry: Entry) -> None:
        """Its mailbox is failing: into deferred/ for the backoff's cap, untried and uncounted; the canary's
        success brings it back sooner. One debug line: the failing mailbox has its warnings."""
        due = self.clock() + backoff_delay(1, self.backoff_cap, self.backoff_cap)
        await self.journal.defer(entry, due, tried=False)
        log.debug("%s", SUSPENDED, extra={"event": "deferred", "journal_id": entry.id, "mailbox": entry.mailbox})
        self._done(entry)
        self._deferred_until(due)

    def _suspended(self, entry: Entry) -> bool:
        """Whether `entry` is not tried now: its mailbox failed a moment ago (each canary interval, one goes)."""
        if entry.mailbox not in self._failing:
            return False
        tried, reason = self._failing[entry.mailbox]
        now = time.monotonic()
        if now - tried >= self.canary_seconds:
            self._failing[entry.mailbox] = (now, reason)  # this one is the real attempt
            return False
        return True

    async def _read(self, entry: Entry) -> bytes | None:
        """The stored message, checked whole; None when there is nothing to deliver. A damaged entry is set aside
        (quarantine/) rather than delivered as it is or retried for ever."""
        try:
            if (entry.stored_size or entry.size) <= READ_INLINE:
                return self.journal.read_message(entry)
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
                # The one line a delivered message gets: what it is, where it went, how long it took.
                log.info(
                    "delivered",
                    extra={
                        "event": "delivered",
                        "journal_id": entry.id,
                        "mailbox": entry.mailbox,
                        "key": entry.key,
                        "handler": entry.handler,
                        "source": entry.source,
                        "ingress": entry.ingress,
                        "rcpt": entry.rcpt,
                        "mail_from": entry.mail_from,
                        "note": entry.note,
                        "sink": entry.sink,
                        "detail": detail,
                        "latency_ms": round((self.clock() - entry.received_at) * 1000, 1),
                        "attempts": entry.attempts,
                    },
                )
                self._done(entry)
                self._streak.pop(entry.mailbox or "", None)
                if entry.mailbox in self._failing:
                    del self._failing[entry.mailbox]
                    self._retry_all = True
                    self._wake.set()
                    log.info(
                        "%s delivers again: deferred entries are retried now", entry.sink,
                        extra={"event": "recovered", "mailbox": entry.mailbox, "sink": entry.sink},
                    )  # fmt: skip
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
                due = self.clock() + delay
                await self.journal.defer(entry, due)
                self.stats.transient += 1
                log.warning(
                    "temporary failure, retry in %.1fs: %s",
                    delay,
                    reason,
                    extra={"event": "deferred", "journal_id": entry.id, "mailbox": entry.mailbox, "sink": entry.sink},
                )
                self._done(entry)
                self._deferred_until(due)
                if entry.mailbox is not None:
                    self._failed(entry.mailbox, reason)

    def _failed(self, mailbox: str, reason: str) -> None:
        """A real attempt failed for the time being: SUSPEND_AFTER in a row, and the mailbox is failing."""
        streak = self._streak[mailbox] = self._streak.get(mailbox, 0) + 1
        if mailbox in self._failing:
            self._failing[mailbox] = (self._failing[mailbox][0], reason)
        elif streak >= SUSPEND_AFTER:
            self._failing[mailbox] = (time.monotonic(), reason)
            self._retry_all = False  # it fails again: back to each entry's own time
            self._wake.set()  # the refill may be asleep until a retry falls due: it has a canary to send now
            log.warning(
                "%s: %d attempts failed in a row; one attempt every %.0f s until one succeeds: %s",
                mailbox, streak, self.canary_seconds, reason, extra={"event": "suspended", "mailbox": mailbox},
            )  # fmt: skip

    def _done(self, entry: Entry) -> None:
        self._known.pop(entry.id, None)
        waiting = self._spilled or self._retry_all or (self._next_due is not None and self._next_due <= self.clock())
        if waiting and self._worth_refilling():
            self._wake.set()  # room for what waits on disk
