"""The dispatcher's queue, as Postfix's: deferred/ on disk with each entry's retry time, a bounded active window,
and a sink that answers again getting everything that waits for it at once."""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lmtp_gateway import dispatch
from lmtp_gateway.journal import State
from tests.conftest import REPLY_RCPT, StartGateway, eventually, make_config, numbered_message
from tests.test_sidekiq import jobs


def sidekiq_config(tmp_path: Path, redis: Any) -> Any:
    return make_config(tmp_path / "spool", incoming_email={"delivery_method": "sidekiq"}, redis={"url": redis.url})


def deferred_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "spool" / "deferred").glob("*.json"))


async def send(gateway: Any, numbers: range) -> None:
    client = await gateway.client()
    for number in numbers:
        assert (await client.send("a@example.org", [REPLY_RCPT], numbered_message(number))).results[0][:3] == "250"
    await client.quit()


def delivered_numbers(redis: Any) -> Counter[int]:
    found = (re.search(r"Subject: message (\d+)", job["args"][0]) for job in jobs(redis))
    return Counter(int(match[1]) for match in found if match)


async def test_a_deferred_entry_waits_on_disk_until_its_time(
    start_gateway: StartGateway, redis: Any, tmp_path: Path
) -> None:
    redis.stop()
    gateway = await start_gateway(sidekiq_config(tmp_path, redis), backoff_base=3600)
    await send(gateway, range(3))
    dispatcher = gateway.gateway.dispatcher
    await eventually(lambda: dispatcher.stats.transient == 3, what="three entries deferred")
    assert len(deferred_files(tmp_path)) == 3
    assert dispatcher.active == 0  # out of memory: nothing to do for five minutes (the backoff's cap)
    assert dispatcher.backlog == 3
    for path in deferred_files(tmp_path):
        retry_at = os.stat(path).st_mtime  # what the deferred scan reads: no metadata
        assert time.time() + 200 < retry_at < time.time() + 400
    assert not list((tmp_path / "spool" / "pending").glob("*.json"))


async def test_when_the_sink_answers_again_everything_deferred_goes_at_once(
    start_gateway: StartGateway, redis: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backoff is five minutes here: without the canary (one attempt every few seconds while a mailbox fails) the
    mail would wait that long after Redis came back."""
    monkeypatch.setattr(dispatch, "CANARY_SECONDS", 0.2)
    redis.stop()
    gateway = await start_gateway(sidekiq_config(tmp_path, redis), backoff_base=3600)
    await send(gateway, range(20))
    await eventually(lambda: len(deferred_files(tmp_path)) == 20, what="everything deferred")
    redis.start()
    await eventually(lambda: sum(delivered_numbers(redis).values()) >= 20, what="all 20 jobs")
    assert delivered_numbers(redis) == Counter(range(20))
    await eventually(lambda: gateway.gateway.dispatcher.backlog == 0, what="an empty deferred queue")
    assert len(list((tmp_path / "spool" / State.DELIVERED.value).glob("*.json"))) == 20


async def test_a_mailbox_that_starts_failing_is_tried_again_whatever_its_retry_times(
    start_gateway: StartGateway, redis: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each retry here falls due later than the one before, so no deferral wakes the refill: the mailbox's
    third failure in a row must, or the refill sleeps until the first retry's time with no attempt meanwhile."""
    monkeypatch.setattr(dispatch, "CANARY_SECONDS", 0.2)
    delays = iter(range(300, 400))
    monkeypatch.setattr(dispatch, "backoff_delay", lambda *_, **__: float(next(delays)))
    redis.stop()
    gateway = await start_gateway(sidekiq_config(tmp_path, redis), backoff_base=3600)
    await send(gateway, range(3))
    await eventually(lambda: gateway.gateway.dispatcher.stats.transient == 3, what="three failed attempts")
    redis.start()
    await eventually(lambda: sum(delivered_numbers(redis).values()) >= 3, what="all 3 jobs")
    assert delivered_numbers(redis) == Counter(range(3))


async def test_the_active_window_bounds_what_is_held_in_memory(
    start_gateway: StartGateway, redis: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch, "ACTIVE_WINDOW", 5)
    monkeypatch.setattr(dispatch, "CANARY_SECONDS", 0.2)
    redis.stop()
    gateway = await start_gateway(sidekiq_config(tmp_path, redis), backoff_base=0.05)
    dispatcher = gateway.gateway.dispatcher
    largest = 0
    client = await gateway.client()
    for number in range(60):
        assert (await client.send("a@example.org", [REPLY_RCPT], numbered_message(number))).results[0][:3] == "250"
        largest = max(largest, dispatcher.active)
    await client.quit()
    await eventually(lambda: len(deferred_files(tmp_path)) == 60, what="every entry deferred (tried or not)")
    assert largest <= 5
    redis.start()
    await eventually(lambda: sum(delivered_numbers(redis).values()) >= 60, what="all 60 jobs")
    assert delivered_numbers(redis) == Counter(range(60))
    await eventually(lambda: dispatcher.backlog == 0, what="nothing waits")


async def test_a_failing_mailbox_is_tried_once_in_a_while_and_the_rest_wait_untried(
    start_gateway: StartGateway, redis: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three failures in a row and the mailbox counts as failing: its other entries are deferred without a
    connection attempt (their metadata untouched, their retry time the backoff's cap), one warning says so."""
    redis.stop()
    gateway = await start_gateway(sidekiq_config(tmp_path, redis), backoff_base=60)  # canary: every 5 s
    await send(gateway, range(10))
    dispatcher = gateway.gateway.dispatcher
    await eventually(lambda: len(deferred_files(tmp_path)) == 10, what="all ten deferred")
    assert dispatcher.stats.transient == 3  # the three real attempts; the seven others untried
    journal = gateway.gateway.journal
    untried = [e for e in journal.entries(State.DEFERRED) if e.attempts == 0]
    assert len(untried) == 7 and all(e.last_error is None for e in untried)
    assert all(e.next_attempt_at and e.next_attempt_at > time.time() + 200 for e in untried)  # from the file's time
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and r.__dict__.get("event") == "suspended"]
    assert len(warnings) == 1 and "3 attempts failed in a row" in warnings[0].getMessage()
