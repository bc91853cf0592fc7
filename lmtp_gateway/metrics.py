"""Prometheus metrics: what happened to mail, counted where it happens, served by ``ops``.

One ``Metrics`` object per running gateway (or collector), each with its own ``CollectorRegistry`` rather than
prometheus_client's global one: two gateways in one process (the tests start many) then never collide on metric
names, each ``/metrics`` shows exactly its own gateway's counts, and nothing else a library registers globally
leaks into it. The components that see an event (ingress, intake, dispatcher, a collector) are handed the object
and call one method per event; the backlog gauges are read at scrape time from a function, not kept up to date.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "lmtp_gateway"
COLLECTOR_STATES = ("connecting", "idle", "fetching", "backoff", "stopped")
# Delivery latency: milliseconds when GitLab's Redis is at hand, minutes when it was down for a while.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)

# Why a recipient was refused: a short, fixed set, so the `reason` label cannot grow without bound.
REJECT_REASONS = {
    "unknown_address": "no GitLab mailbox has the address (550 at RCPT)",
    "unknown_key": "the address's key fits no GitLab handler (550 at RCPT)",
    "no_key": "dedicated address and no key in the headers (550 after DATA)",
    "too_large": "larger than lmtp.max_message_size (552)",
    "too_many_recipients": "past lmtp.max_recipients or lmtp.max_transaction_bytes: sent again later (452)",
    "bad_address": "an envelope address that is not UTF-8 or holds control characters (553)",
    "line_too_long": "a line over 1000 bytes (500)",
    "journal_error": "the journal could not be written (452)",
    "internal_error": "an internal fault (451)",
}
DROP_REASONS = ("auto_generated", "duplicate", "gitlab_fails", "rejected")
# What generate_latest writes for names like ours: the classic text format, which every Prometheus reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Backlog = Callable[[], tuple[int, float | None]]  # (pending entries, received_at of the oldest or None)


class Metrics:
    """The instruments of one gateway, and one method per event worth counting."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.clock = clock or time.time
        self._backlog: Backlog = lambda: (0, None)
        self._backlog_now: tuple[int, float | None] = (0, None)  # read once per scrape: it lists the journal
        self._quarantined: Callable[[], int] = lambda: 0

        def counter(name: str, text: str, *labels: str) -> Counter:
            return Counter(f"{PREFIX}_{name}", text, labels, registry=self.registry)

        self.messages_received = counter(
            "messages_received", "Messages received whole (per LMTP transaction, collected or replayed message).",
            "ingress",
        )  # fmt: skip
        self.accepted = counter("accepted", "Copies committed to the journal for delivery, per mailbox.", "mailbox")
        self.rejected = counter("rejected", "Recipients refused, by reason.", "reason")
        self.dropped = counter(
            "dropped",
            "Copies accepted and not delivered, per mailbox and reason: auto_generated, duplicate (GitLab would route "
            "it as a copy already delivering), gitlab_fails (GitLab's receiver would raise), rejected (collected).",
            "mailbox", "reason",
        )  # fmt: skip
        self.delivered = counter("delivered", "Entries delivered to GitLab.", "mailbox", "sink")
        self.failed = counter("failed", "Entries refused for good (dead letters in failed/).", "mailbox", "sink")
        self.deferred = counter("deferred", "Delivery attempts that failed temporarily.", "mailbox", "sink")
        self.timeouts = counter(
            "delivery_timeouts",
            "Delivery attempts GitLab did not answer in time: it may have processed the message, which is sent again.",
            "mailbox", "sink",
        )  # fmt: skip
        self.collected = counter("collected", "Messages a collector fetched from its mailbox.", "mailbox")
        self.latency = Histogram(
            f"{PREFIX}_delivery_latency_seconds",
            "From the journal commit to the sink's confirmation, retries included.",
            ("mailbox", "sink"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.collector_state = Gauge(
            f"{PREFIX}_collector_state",
            "1 for the collector's current state (connecting, idle, fetching, backoff, stopped).",
            ("mailbox", "state"),
            registry=self.registry,
        )
        backlog = Gauge(
            f"{PREFIX}_journal_pending",
            "Journal entries waiting for delivery (in pending/ and deferred/).",
            registry=self.registry,
        )
        backlog.set_function(lambda: self._backlog_now[0])
        self.active = Gauge(
            f"{PREFIX}_dispatch_active",
            "Entries in the dispatcher's active window (in memory; the rest of the backlog waits on disk).",
            registry=self.registry,
        )
        oldest = Gauge(
            f"{PREFIX}_journal_oldest_pending_age_seconds",
            "Age of the oldest entry waiting for delivery (0 when none waits).",
            registry=self.registry,
        )
        oldest.set_function(self._oldest_age)
        quarantined = Gauge(
            f"{PREFIX}_journal_quarantined",
            "Entries found damaged and set aside in quarantine/ (never delivered as they are; alert on > 0).",
            registry=self.registry,
        )
        quarantined.set_function(lambda: self._quarantined())

    # --- set-up ---

    def watch_backlog(self, backlog: Backlog) -> None:
        """Where the backlog gauges read from at scrape time."""
        self._backlog = backlog

    def watch_quarantine(self, quarantined: Callable[[], int]) -> None:
        """Where the count of entries set aside is read from at scrape time."""
        self._quarantined = quarantined

    def declare(self, mailbox: str, sink: str) -> None:
        """Start this mailbox's series at 0, so rate() and alerts work from the first scrape."""
        self.accepted.labels(mailbox=mailbox)
        for reason in DROP_REASONS:
            self.dropped.labels(mailbox=mailbox, reason=reason)
        for family in (self.delivered, self.failed, self.deferred, self.timeouts):
            family.labels(mailbox=mailbox, sink=sink)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything above. Reads the journal's directories: call it in a
        thread, not on the event loop."""
        self._backlog_now = self._backlog()
        return generate_latest(self.registry)

    # --- events ---

    def received(self, ingress: str) -> None:
        self.messages_received.labels(ingress=ingress.split(":", 1)[0]).inc()

    def refused(self, reason: str, count: int = 1) -> None:
        assert reason in REJECT_REASONS, reason
        self.rejected.labels(reason=reason).inc(count)

    def committed(self, mailbox: str | None, dropped: str | None) -> None:
        """A copy is in the journal: to deliver, or (`dropped` says why) not."""
        if dropped is None:
            self.accepted.labels(mailbox=mailbox or "-").inc()
        else:
            assert dropped in DROP_REASONS, dropped
            self.dropped.labels(mailbox=mailbox or "-", reason=dropped).inc()

    def outcome(
        self, mailbox: str | None, sink: str | None, kind: str, received_at: float, *, timed_out: bool = False
    ) -> None:
        """`kind`: delivered | failed | deferred (the dispatcher's three outcomes)."""
        labels = {"mailbox": mailbox or "-", "sink": sink or "-"}
        getattr(self, kind).labels(**labels).inc()
        if timed_out:
            self.timeouts.labels(**labels).inc()
        if kind == "delivered":
            self.latency.labels(**labels).observe(max(0.0, self.clock() - received_at))

    # --- for collectors ---

    def set_collector_state(self, mailbox: str, state: str) -> None:
        """The collector of `mailbox` is now in `state` (one of COLLECTOR_STATES): that series 1, the others 0."""
        if state not in COLLECTOR_STATES:
            raise ValueError(f"collector state {state!r}: expected one of {', '.join(COLLECTOR_STATES)}")
        for name in COLLECTOR_STATES:
            self.collector_state.labels(mailbox=mailbox, state=name).set(1 if name == state else 0)

    def count_collected(self, mailbox: str, count: int = 1) -> None:
        """A collector fetched `count` messages from `mailbox`."""
        self.collected.labels(mailbox=mailbox).inc(count)

    def _oldest_age(self) -> float:
        _, oldest = self._backlog_now
        return 0.0 if oldest is None else max(0.0, self.clock() - oldest)
