"""Delivery into a real Redis as Sidekiq jobs: the job format, dedupe, Redis outages and kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lmtp_gateway.dispatch import backoff_delay
from lmtp_gateway.journal import Entry, State
from lmtp_gateway.sinks import SidekiqSink, redis_client
from tests.conftest import REPLY_RCPT, StartGateway, eventually, make_config, message, numbered_message
from tests.lmtp_client import LmtpClient

DESK_RCPT = "contact+project_slug-project_key@incoming.test"


def sidekiq_config(spool: Path, redis: Any, **redis_settings: Any) -> Any:
    return make_config(
        spool,
        incoming_email={"delivery_method": "sidekiq"},
        service_desk_email={"delivery_method": "sidekiq"},
        redis={"url": redis.url, **redis_settings},
    )


def jobs(redis: Any, queue: str = "queue:default") -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in redis.command("LRANGE", queue, "0", "-1")]


async def test_job_json_is_what_gitlab_expects(start_gateway: StartGateway, redis: Any, tmp_path: Path) -> None:
    gateway = await start_gateway(sidekiq_config(tmp_path / "spool", redis))
    client = await gateway.client()
    raw = numbered_message(1, body="Grüße")
    before = time.time()
    done = await client.send("alice@example.org", [REPLY_RCPT, DESK_RCPT], raw)
    await client.quit()
    await eventually(lambda: len(jobs(redis)) == 2, what="two jobs")
    assert redis.command("SMEMBERS", "queues") == [b"default"]
    by_class = {job["class"]: job for job in jobs(redis)}
    assert set(by_class) == {"EmailReceiverWorker", "ServiceDeskEmailReceiverWorker"}
    job = by_class["EmailReceiverWorker"]
    assert set(job) == {"class", "args", "queue", "jid", "retry", "created_at", "enqueued_at"}
    assert job["queue"] == "default" and job["retry"] == 3
    assert re.fullmatch(r"[0-9a-f]{24}", job["jid"]) and job["jid"] == done.results[0].split()[3]
    assert isinstance(job["created_at"], float) and before <= job["created_at"] <= time.time()
    assert job["enqueued_at"] == job["created_at"]
    (body,) = job["args"]
    expected = f"Return-Path: <alice@example.org>\r\nDelivered-To: {REPLY_RCPT}\r\n".encode() + raw.replace(
        b"\n", b"\r\n"
    )
    assert body.encode() == expected


async def test_sidekiq8_timestamps_queue_and_namespace(start_gateway: StartGateway, redis: Any, tmp_path: Path) -> None:
    config = sidekiq_config(
        tmp_path / "spool", redis, timestamp_style="sidekiq8", queue="email_receiver", namespace="resque:gitlab"
    )
    gateway = await start_gateway(config)
    client = await gateway.client()
    await client.send("a@example.org", [REPLY_RCPT], numbered_message(2))
    await client.quit()
    await eventually(lambda: jobs(redis, "resque:gitlab:queue:email_receiver"), what="namespaced job")
    (job,) = jobs(redis, "resque:gitlab:queue:email_receiver")
    assert isinstance(job["enqueued_at"], int) and abs(job["enqueued_at"] / 1000 - time.time()) < 60
    assert job["queue"] == "email_receiver"
    assert redis.command("SMEMBERS", "resque:gitlab:queues") == [b"email_receiver"]


async def test_push_is_once_per_fingerprint_unless_forced(redis: Any, tmp_path: Path) -> None:
    config = sidekiq_config(tmp_path / "spool", redis)
    client = redis_client(config.redis)
    sink = SidekiqSink("incoming_email", config.redis, client, 3600)
    entry = Entry(
        id="a" * 24, fingerprint="a" * 64, state=State.PENDING, received_at=time.time(), ingress="test",
        mail_from="", rcpt=REPLY_RCPT, mailbox="incoming_email", key="k", handler="create_note", source="to",
        reason="", size=3,
    )  # fmt: skip
    try:
        assert (await sink.deliver(entry, b"abc")).detail == "pushed"
        assert "dedupe" in (await sink.deliver(entry, b"abc")).detail
        assert len(jobs(redis)) == 1
        await sink.deliver(entry, b"abc", force=True)
        assert len(jobs(redis)) == 2
    finally:
        await client.aclose()


async def test_redis_down_under_load_loses_and_doubles_nothing(
    start_gateway: StartGateway, redis: Any, tmp_path: Path
) -> None:
    gateway = await start_gateway(sidekiq_config(tmp_path / "spool", redis), backoff_base=0.05)
    redis.stop()

    async def session(number: int) -> int:
        client = await gateway.client()
        accepted = 0
        for index in range(25):
            done = await client.send("a@example.org", [REPLY_RCPT], numbered_message(number * 1000 + index))
            accepted += done.results[0].startswith("250 2.0.0")
        await client.quit()
        return accepted

    accepted = sum(await asyncio.gather(*(session(n) for n in range(4))))
    assert accepted == 100  # the journal answers for Redis
    await eventually(lambda: gateway.gateway.dispatcher.stats.transient >= 100, what="failed attempts while down")
    assert not gateway.gateway.dispatcher.stats.delivered
    redis.start()
    await eventually(lambda: len(jobs(redis)) == 100, timeout=30, what="all 100 jobs after Redis returns")
    await eventually(lambda: gateway.gateway.dispatcher.backlog == 0, what="empty backlog")
    subjects = Counter(re.search(r"Subject: message (\d+)", job["args"][0])[1] for job in jobs(redis))
    assert len(subjects) == 100 and set(subjects.values()) == {1}


async def test_redis_stalling_mid_load_loses_and_doubles_nothing(
    start_gateway: StartGateway, redis: Any, tmp_path: Path
) -> None:
    """Redis freezes (SIGSTOP: a fork on a swapping host, a stuck disk) while jobs are being pushed. The pushes
    in flight time out, yet Redis runs them when it wakes: the retries must find them done, not push again."""
    gateway = await start_gateway(sidekiq_config(tmp_path / "spool", redis), backoff_base=0.05)
    stalled = asyncio.Event()

    async def session(number: int) -> int:
        client = await gateway.client()
        accepted = 0
        for index in range(25):
            if index == 10:
                await stalled.wait()  # the rest arrive while Redis is frozen
            done = await client.send("a@example.org", [REPLY_RCPT], numbered_message(number * 1000 + index))
            accepted += done.results[0].startswith("250 2.0.0")
        await client.quit()
        return accepted

    sessions = asyncio.gather(*(session(n) for n in range(4)))
    await eventually(lambda: redis.command("LLEN", "queue:default") >= 20, what="the first jobs")
    os.kill(redis.pid, signal.SIGSTOP)
    try:
        stalled.set()
        assert sum(await sessions) == 100  # the journal answers while Redis cannot
        dispatcher = gateway.gateway.dispatcher
        await eventually(lambda: dispatcher.stats.transient >= 1, timeout=30, what="pushes timing out")
    finally:
        os.kill(redis.pid, signal.SIGCONT)
    await eventually(lambda: dispatcher.backlog == 0, timeout=60, what="everything delivered after Redis wakes")
    subjects = Counter(re.search(r"Subject: message (\d+)", job["args"][0])[1] for job in jobs(redis))
    assert len(subjects) == 100 and set(subjects.values()) == {1}


def _send_until_killed(address: str, start_number: int, acknowledged: set[int]) -> int:
    """Send messages until the server dies; record every 250. Returns the next unused number."""

    async def run() -> int:
        number = start_number
        try:
            client = await LmtpClient.connect(address)
            await client.lhlo()
            while True:
                done = await client.send("a@example.org", [REPLY_RCPT], numbered_message(number))
                if done.results and done.results[0].startswith("250 2.0.0"):
                    acknowledged.add(number)
                number += 1
        except (ConnectionError, OSError, asyncio.IncompleteReadError, TimeoutError):
            return number + 1  # the one in flight may or may not have been journaled

    return asyncio.run(run())


async def test_kill_9_during_load_every_250_ends_in_redis_exactly_once(
    gateway_process: Any, redis: Any, tmp_path: Path
) -> None:
    sections = {
        "incoming_email": {"delivery_method": "sidekiq"},
        "service_desk_email": {"delivery_method": "sidekiq"},
        "redis": {"url": redis.url},
    }
    process = gateway_process(**sections)
    acknowledged: set[int] = set()
    number = 0
    for _round in range(5):
        target = len(acknowledged) + random.randint(10, 40)
        task = asyncio.ensure_future(asyncio.to_thread(_send_until_killed, process.address, number, acknowledged))
        await eventually(lambda: len(acknowledged) >= target, timeout=60, what=f"{target} acknowledged")  # noqa: B023
        process.kill()  # SIGKILL while the client is mid-stream
        number = await task
        process.start()
    assert len(acknowledged) > 50, "the load was too small to mean anything"
    await eventually(lambda: len(jobs(redis)) >= len(acknowledged), timeout=30, what="recovery after the last kill")
    delivered = Counter(int(re.search(r"Subject: message (\d+)", job["args"][0])[1]) for job in jobs(redis))
    assert acknowledged <= set(delivered), f"lost: {sorted(acknowledged - set(delivered))[:10]}"
    assert set(delivered.values()) == {1}, "a message was pushed twice"
    assert process.terminate() == 0


async def test_delivery_through_redis_sentinel(start_gateway: StartGateway, redis: Any, tmp_path: Path) -> None:
    """GitLab's Sentinel set-up: the URL names the master, sentinels say where it is."""
    from tests.servers import free_port, require_binary, start_process, stop_process, wait_until

    binary = require_binary("redis-server", "redis-server")
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor gitlab-redis 127.0.0.1 {redis.port} 1\n"
        "sentinel down-after-milliseconds gitlab-redis 60000\n"
    )
    sentinel = start_process([binary, str(conf), "--sentinel"], cwd=tmp_path, output=tmp_path / "sentinel.log")
    try:

        def knows_master() -> bool:
            import socket

            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"SENTINEL get-master-addr-by-name gitlab-redis\r\n")
                return str(redis.port).encode() in s.recv(200)
            return False

        wait_until(knows_master, timeout=60, what="sentinel", proc=sentinel)
        config = make_config(
            tmp_path / "spool",
            incoming_email={"delivery_method": "sidekiq"},
            service_desk_email={"delivery_method": "sidekiq"},
            redis={"url": "redis://gitlab-redis/0", "sentinels": [{"host": "127.0.0.1", "port": port}]},
        )
        gateway = await start_gateway(config)
        client = await gateway.client()
        done = await client.send("a@example.org", [REPLY_RCPT], numbered_message(77))
        await client.quit()
        assert done.results[0].startswith("250 2.0.0")
        await eventually(lambda: jobs(redis), what="a job in the master Sentinel named")
        assert jobs(redis)[0]["jid"] == done.results[0].split()[3]
    finally:
        stop_process(sentinel)


def test_retries_back_off_exponentially_up_to_the_cap() -> None:
    delays = [backoff_delay(attempt, base=1.0, cap=300.0, jitter=0.0) for attempt in range(1, 12)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    jittered = {round(backoff_delay(3, base=1.0, cap=300.0), 3) for _ in range(50)}
    assert len(jittered) > 1 and all(3.6 <= delay <= 4.4 for delay in jittered)  # ±10%: retries do not march


async def test_copies_gitlab_routes_alike_make_one_job(start_gateway: StartGateway, redis: Any, tmp_path: Path) -> None:
    """A reply sent To: one issue's reply address and Cc: another's reaches the gateway for both; GitLab routes
    both copies by To, so one job carries it, also when Postfix hands the second copy over in another
    transaction. The second copy is journaled as dropped, naming the first."""
    gateway = await start_gateway(sidekiq_config(tmp_path / "spool", redis))
    other_rcpt = "incoming+0123456789abcdef0123456789abcdef@incoming.test"
    raw = message(f"To: {REPLY_RCPT}", f"Cc: {other_rcpt}", "Subject: Re: both", "Message-ID: <both@example.org>")
    client = await gateway.client()
    together = await client.send("alice@example.org", [REPLY_RCPT, other_rcpt], raw)
    carrier = together.results[0].split()[3]
    assert together.results[1].endswith(f"same GitLab target as {carrier}: delivered once")
    again = message(f"To: {REPLY_RCPT}", f"Cc: {other_rcpt}", "Subject: Re: split", "Message-ID: <split@example.org>")
    first = await client.send("alice@example.org", [other_rcpt], again)  # Postfix split the recipients
    second = await client.send("alice@example.org", [REPLY_RCPT], again)
    assert "queued" in first.results[0] and "same GitLab target as" in second.results[0]
    await client.quit()
    await eventually(lambda: gateway.gateway.dispatcher.backlog == 0 and len(jobs(redis)) == 2, what="two jobs")
    assert len(jobs(redis)) == 2  # one per message, not one per copy
    dropped = list(gateway.gateway.journal.entries(State.DROPPED))
    assert {e.drop for e in dropped} == {"duplicate"} and len(dropped) == 2
    assert all(e.key == REPLY_RCPT.split("+")[1].split("@")[0] for e in dropped)
