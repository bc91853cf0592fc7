"""Sidekiq delivery through Redis Sentinel while the master changes under load: a coordinated failover
(SENTINEL FAILOVER) and a crash (SIGKILL), with real Redis nodes, a real Sentinel and `lmtp-gateway serve`.
Every message answered 250 must end as exactly one job in the Redis that is master at the end.

Before those, the guard that makes it so (`redis.replicas_to_wait`), on a master and a replica whose link can be
held back: a job is written only on a master with the replicas it must be on, and counts as delivered only once
they acknowledge it."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmtp_gateway.config import Config
from lmtp_gateway.errors import ConfigError
from lmtp_gateway.journal import Entry, State
from lmtp_gateway.sinks import Delivered, SidekiqSink, Transient, redis_client
from tests.conftest import REPLY_RCPT, GatewayProcess, make_config, numbered_message
from tests.lmtp_client import LmtpClient
from tests.servers import LOOPBACK, free_port, wait_until
from tests.servers.redis import RedisServer
from tests.servers.sentinel import NODE_CONFIG, LinkRelay, SentinelGroup, SentinelServer, wait_replicating

SUBJECT = re.compile(r"Subject: message (\d+)")


@pytest.fixture
def sentinel_group() -> Iterator[SentinelGroup]:
    with SentinelGroup(down_after_ms=1000) as group:
        yield group


@pytest.fixture
def relayed_group() -> Iterator[SentinelGroup]:
    """The replica follows the master through a link that can be held back (SentinelGroup.link)."""
    with SentinelGroup(down_after_ms=1000, relayed=True) as group:
        yield group


@dataclass
class LaggingPair:
    """A master and its replica, replicating through a link the test can hold back (no Sentinel)."""

    master: RedisServer
    replica: RedisServer
    link: LinkRelay


@pytest.fixture
def lagging_pair() -> Iterator[LaggingPair]:
    master = RedisServer(extra_config=NODE_CONFIG).start()
    link = LinkRelay(master.port)
    replica = RedisServer(extra_config={**NODE_CONFIG, "replicaof": f"{LOOPBACK} {link.port}"})
    try:
        replica.start()
        wait_replicating(replica, master, via=link.port)
        yield LaggingPair(master, replica, link)
    finally:
        link.close()
        replica.stop()
        master.stop()


def sink_config(tmp_path: Path, redis: RedisServer, **settings: Any) -> Config:
    return make_config(
        tmp_path / "spool",
        incoming_email={"delivery_method": "sidekiq"},
        redis={"url": redis.url, **settings},
    )


def entry(letter: str) -> Entry:
    return Entry(
        id=letter * 24, fingerprint=letter * 64, state=State.PENDING, received_at=0.0, ingress="test", mail_from="",
        rcpt=REPLY_RCPT, mailbox="incoming_email", key="k", handler="create_note", source="to", reason="", size=3,
    )  # fmt: skip


def queue_length(redis: RedisServer) -> int:
    return int(redis.command("LLEN", "queue:default"))  # type: ignore[arg-type]


async def test_a_job_counts_once_a_replica_has_it_and_a_retry_waits_again(
    lagging_pair: LaggingPair, tmp_path: Path
) -> None:
    master, replica, link = lagging_pair.master, lagging_pair.replica, lagging_pair.link
    config = sink_config(tmp_path, master, replica_wait_timeout="300ms")
    clients = [redis_client(config.redis), redis_client(config.redis)]
    sink, fresh = (SidekiqSink("incoming_email", config.redis, client, 3600) for client in clients)
    try:
        assert await sink.deliver(entry("a"), b"one") == Delivered("pushed, on 1 replica")
        link.hold()  # the replica falls behind: the master acknowledges the push, the replica does not
        held = await sink.deliver(entry("b"), b"two")
        assert isinstance(held, Transient) and "0 of the 1 replicas needed acknowledged it" in held.reason
        assert (queue_length(master), queue_length(replica)) == (2, 1)
        # The retry finds the job and waits again (here from another client, as after a reconnection)
        again = await fresh.deliver(entry("b"), b"two")
        assert isinstance(again, Transient) and "acknowledged it within 0.3s" in again.reason
        link.release()
        done = await fresh.deliver(entry("b"), b"two")
        assert done == Delivered("already in Redis (dedupe), on 1 replica")
        assert (queue_length(master), queue_length(replica)) == (2, 2)  # what WAIT acknowledged is there
    finally:
        for client in clients:
            await client.aclose()


async def test_replicas_to_wait_0_trusts_the_master_alone(lagging_pair: LaggingPair, tmp_path: Path) -> None:
    config = sink_config(tmp_path, lagging_pair.master, replicas_to_wait=0)
    client = redis_client(config.redis)
    sink = SidekiqSink("incoming_email", config.redis, client, 3600)
    try:
        lagging_pair.link.hold()
        assert await sink.deliver(entry("c"), b"three") == Delivered("pushed")
        assert queue_length(lagging_pair.replica) == 0  # delivered, yet only the master has it
    finally:
        await client.aclose()


async def test_too_few_replicas_answers_at_once_and_readiness_says_why(
    lagging_pair: LaggingPair, tmp_path: Path
) -> None:
    config = sink_config(tmp_path, lagging_pair.master, replicas_to_wait=2, replica_wait_timeout="60s")
    client = redis_client(config.redis)
    sink = SidekiqSink("incoming_email", config.redis, client, 3600)
    try:
        for _ in range(2):  # without blocking for replica_wait_timeout: the master has 1, it cannot be 2
            outcome = await asyncio.wait_for(sink.deliver(entry("d"), b"four"), 30)
            reason = "redis: not written: the master has 1 connected replicas and 2 must hold each job"
            assert outcome == Transient(reason)
        assert queue_length(lagging_pair.master) == 0  # nothing left on a master that cannot keep it safe
        assert "1 connected replicas and 2 must hold each job" in (await sink.probe() or "")
        assert await sink.probe(queue=False) is None  # collectors' claims need no replica
    finally:
        await client.aclose()


async def test_a_lone_master_without_sentinel_needs_no_replica(tmp_path: Path) -> None:
    with RedisServer() as alone:
        config = sink_config(tmp_path, alone)
        client = redis_client(config.redis)
        sink = SidekiqSink("incoming_email", config.redis, client, 3600)
        try:
            assert await sink.deliver(entry("e"), b"five") == Delivered("pushed")
            assert await sink.probe() is None
        finally:
            await client.aclose()


async def test_a_lone_master_behind_sentinel_needs_no_replica(tmp_path: Path) -> None:
    """Sentinel sees no replica to promote: nothing to wait for, and /readyz has nothing to say."""
    with RedisServer() as alone, SentinelServer(alone.port) as sentinel:
        config = make_config(
            tmp_path / "spool",
            incoming_email={"delivery_method": "sidekiq"},
            redis={"url": "redis://gitlab-redis/0", "sentinels": [{"host": LOOPBACK, "port": sentinel.port}]},
        )
        client = redis_client(config.redis)
        sink = SidekiqSink("incoming_email", config.redis, client, 3600)
        try:
            assert await sink.probe() is None
            assert await sink.deliver(entry("h"), b"eight") == Delivered("pushed")
        finally:
            await client.aclose()


async def test_with_sentinel_every_replica_it_sees_up_must_have_the_job(tmp_path: Path) -> None:
    """Sentinel may promote any replica it sees up, so with two the job must be on both; one that crashed and
    that Sentinel sees down stops counting."""
    with SentinelGroup(replicas=2) as group:
        config = make_config(
            tmp_path / "spool",
            incoming_email={"delivery_method": "sidekiq"},
            redis={"url": group.url, "sentinels": group.sentinels},
        )
        client = redis_client(config.redis)
        sink = SidekiqSink("incoming_email", config.redis, client, 3600)
        try:
            assert await sink.deliver(entry("f"), b"six") == Delivered("pushed, on 2 replicas")
            gone = group.nodes[2]
            gone.crash()

            sentinel = group.sentinel
            assert sentinel is not None

            def seen_down() -> bool:
                return any(
                    each.get("port") == str(gone.port) and "s_down" in each.get("flags", "")
                    for each in sentinel.replicas()
                )

            await asyncio.to_thread(wait_until, seen_down, timeout=60, what="sentinel seeing the replica down")
            refused = await sink.deliver(entry("g"), b"seven")  # the sink still counts two; now it asks again
            assert refused == Transient(
                "redis: not written: the master has 1 connected replicas and 2 must hold each job"
            )
            assert await sink.deliver(entry("g"), b"seven") == Delivered("pushed, on 1 replica")
        finally:
            await client.aclose()


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"replicas_to_wait": "auto", "replica_wait_timeout": "2s"}, ("auto", 2.0)),
        ({"replicas_to_wait": 0, "replica_wait_timeout": "500ms"}, (0, 0.5)),
        ({"replicas_to_wait": "2", "replica_wait_timeout": 1}, (2, 1.0)),
        ({}, ("auto", 2.0)),
    ],
)
def test_replica_settings(tmp_path: Path, settings: dict[str, Any], expected: tuple[object, float]) -> None:
    config = make_config(tmp_path, redis={"url": "redis://gitlab-redis/0", **settings})
    assert (config.redis.replicas_to_wait, config.redis.replica_wait_timeout) == expected


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"replicas_to_wait": "some"}, "redis.replicas_to_wait: expected auto or a whole number of replicas"),
        ({"replicas_to_wait": -1}, "redis.replicas_to_wait: expected auto or a whole number"),
        ({"replica_wait_timeout": 0}, "redis.replica_wait_timeout: expected a time from 1ms to 60s"),
        ({"replica_wait_timeout": "2m"}, "redis.replica_wait_timeout: expected a time from 1ms to 60s"),
    ],
)
def test_replica_settings_are_checked(tmp_path: Path, settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config(tmp_path, redis={"url": "redis://gitlab-redis/0", **settings})


def gateway_sections(group: SentinelGroup, monitoring_port: int, **redis: Any) -> dict[str, Any]:
    """`lmtp-gateway serve` delivering both mailboxes as Sidekiq jobs through the group's Sentinel."""
    return {
        "incoming_email": {"delivery_method": "sidekiq"},
        "service_desk_email": {"delivery_method": "sidekiq"},
        "redis": {"url": group.url, "sentinels": group.sentinels, **redis},
        "monitoring": {"listen": f"127.0.0.1:{monitoring_port}"},
    }


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert found, f"no {name} in /metrics"
    return float(found[1])


async def journal_pending(monitoring_port: int) -> int:
    """Entries the gateway has not finished (its /metrics): 0 once every acknowledged message is delivered."""
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{monitoring_port}/metrics", timeout=10)
    return int(metric(response.text, "lmtp_gateway_journal_pending"))


def job_numbers(redis: RedisServer) -> Counter[int]:
    """How many jobs in `redis`'s queue carry each "Subject: message N"."""
    jobs = [json.loads(raw) for raw in redis.command("LRANGE", "queue:default", "0", "-1")]  # type: ignore[union-attr]
    return Counter(int(SUBJECT.search(job["args"][0])[1]) for job in jobs)  # type: ignore[index]


@dataclass
class Tally:
    """What one scenario sent and what the final master holds."""

    acknowledged: set[int] = field(default_factory=set)
    refused: list[str] = field(default_factory=list)
    jobs: Counter[int] = field(default_factory=Counter)

    @property
    def lost(self) -> set[int]:
        return self.acknowledged - set(self.jobs)

    @property
    def duplicated(self) -> int:
        return sum(count - 1 for count in self.jobs.values() if count > 1)


async def send_through(
    address: str,
    switch: Callable[[], Any],
    *,
    sessions: int = 4,
    before: int = 40,
    after: int = 20,
) -> Tally:
    """`sessions` LMTP sessions send numbered messages without pause; once each has had `before` answered, the
    master is switched (`switch` runs in a thread, and returns when Sentinel names the new master) while they
    keep sending; each sends `after` more once the switch is done."""
    tally = Tally()
    started: list[asyncio.Event] = [asyncio.Event() for _ in range(sessions)]
    switched = asyncio.Event()

    async def session(index: int) -> None:
        client = await LmtpClient.connect(address)
        await client.lhlo()
        number, sent_after = index * 100_000, 0
        while sent_after < after:
            done = await client.send("a@example.org", [REPLY_RCPT], numbered_message(number))
            reply = done.results[0] if done.results else done.data or ""
            if reply.startswith("250 2.0.0"):
                tally.acknowledged.add(number)
            else:
                tally.refused.append(reply)
            number += 1
            if number - index * 100_000 >= before:
                started[index].set()
            if switched.is_set():
                sent_after += 1
        await client.quit()

    async def switch_midway() -> None:
        await asyncio.gather(*(event.wait() for event in started))
        await asyncio.to_thread(switch)
        switched.set()

    await asyncio.gather(switch_midway(), *(session(index) for index in range(sessions)))
    return tally


async def settle_and_count(
    group: SentinelGroup, tally: Tally, pending: Callable[[], Awaitable[int]], timeout: float = 120
) -> Tally:
    """Wait until the gateway has finished every entry and the group is whole again, then count the jobs in the
    master Sentinel names."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await pending():
        assert asyncio.get_running_loop().time() < deadline, f"gateway still has entries after {timeout}s"
        await asyncio.sleep(0.1)
    master = await asyncio.to_thread(group.wait_settled)
    tally.jobs = job_numbers(master)
    return tally


def crash_lagging_master(group: SentinelGroup, writes: int = 10) -> RedisServer:
    """Hold the replica's link, let the master take `writes` more jobs, then SIGKILL it and cut the link: what
    a machine crash does to writes its replica has not received yet. Returns the node Sentinel promotes."""
    assert group.link is not None
    master = group.master()
    group.link.hold()
    base = int(master.command("LLEN", "queue:default"))  # type: ignore[arg-type]
    wait_until(
        lambda: int(master.command("LLEN", "queue:default")) >= base + writes,  # type: ignore[arg-type]
        timeout=60,
        what=f"{writes} jobs on the master while its replica lags",
    )
    return group.crash_master()


async def test_coordinated_failover_under_load_loses_and_doubles_nothing(
    gateway_process: Callable[..., GatewayProcess], sentinel_group: SentinelGroup
) -> None:
    port = free_port()
    process = gateway_process(**gateway_sections(sentinel_group, port))
    first = sentinel_group.master()
    tally = await send_through(process.address, sentinel_group.failover)
    assert sentinel_group.master() is not first
    await settle_and_count(sentinel_group, tally, lambda: journal_pending(port))
    assert not tally.refused, tally.refused[:3]
    assert len(tally.acknowledged) >= 4 * 60
    assert not tally.lost, f"lost {len(tally.lost)} of {len(tally.acknowledged)}: {sorted(tally.lost)[:10]}"
    assert tally.duplicated == 0
    assert set(tally.jobs) == tally.acknowledged
    assert process.terminate() == 0


async def test_master_crash_under_load_loses_and_doubles_nothing(
    gateway_process: Callable[..., GatewayProcess], relayed_group: SentinelGroup
) -> None:
    """SIGKILL of a master whose replica is behind. On one host a killed master's last writes still reach the
    replica (the kernel sends what the process had written), so the link is held back first: what a crashed
    machine, or a slow link, leaves unreplicated. Jobs acknowledged only by the old master are lost with it
    unless the gateway waited for the replica."""
    port = free_port()
    process = gateway_process(**gateway_sections(relayed_group, port))
    first = relayed_group.master()
    tally = await send_through(process.address, lambda: crash_lagging_master(relayed_group))
    assert relayed_group.master() is not first
    await asyncio.to_thread(relayed_group.revive, first)  # back, empty, as a replica of the new master
    await settle_and_count(relayed_group, tally, lambda: journal_pending(port))
    assert not tally.refused, tally.refused[:3]
    assert not tally.lost, f"lost {len(tally.lost)} of {len(tally.acknowledged)}: {sorted(tally.lost)[:10]}"
    assert tally.duplicated == 0
    assert set(tally.jobs) == tally.acknowledged
    assert process.terminate() == 0
