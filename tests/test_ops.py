"""The monitoring listener against running gateways: /metrics after real LMTP deliveries, /livez, /readyz flipping
with a real Redis and a real read-only file system, and the HTTP responder's manners with bad or slow clients."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmtp_gateway.errors import ListenError
from lmtp_gateway.metrics import Metrics
from lmtp_gateway.ops import OpsServer
from tests.conftest import (
    REPLY_RCPT,
    StartGateway,
    eventually,
    mailroom_secret_file,
    make_config,
    message,
    numbered_message,
    remount,
)
from tests.gitlab_stub import GitLabStub

DESK_RCPT = "contact+project_slug-project_key@incoming.test"
MONITORING = {"listen": "127.0.0.1:0"}


def sample(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from a Prometheus text exposition (parsed by prometheus_client's own parser)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


async def get(address: str, path: str, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.request(method, f"http://{address}{path}")


async def answer_becomes(address: str, path: str, status: int, timeout: float = 30) -> httpx.Response:
    """Ask until the status is `status`: /readyz keeps its answer for the probe cache's few seconds."""
    deadline = time.monotonic() + timeout
    while True:
        response = await get(address, path)
        if response.status_code == status:
            return response
        assert time.monotonic() < deadline, f"{path} still answers {response.status_code}: {response.text}"
        await asyncio.sleep(0.05)


async def metrics_text(gateway: Any) -> str:
    response = await get(gateway.gateway.ops.address, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text


async def test_metrics_count_what_happened_to_real_mail(
    start_gateway: StartGateway, redis: Any, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path / "spool",
        incoming_email={"delivery_method": "sidekiq"},
        redis={"url": redis.url},
        lmtp={"max_message_size": 20_000},
        monitoring=MONITORING,
    )
    gateway = await start_gateway(config)
    client = await gateway.client()
    unknown, bad_key = "nobody@incoming.test", "incoming+!!!bad!!!@incoming.test"
    done = await client.send("a@example.org", [REPLY_RCPT, DESK_RCPT, unknown, bad_key], numbered_message(1))
    assert [r[:3] for r in done.rcpt_replies] == ["250", "250", "550", "550"]
    auto = message("From: robot@example.org", f"To: {REPLY_RCPT}", "Auto-Submitted: auto-replied", "Subject: away")
    assert "discarded" in (await client.send("a@example.org", [REPLY_RCPT], auto)).results[0]
    big = await client.send("a@example.org", [REPLY_RCPT, DESK_RCPT], message("Subject: big", body="x\n" * 15_000))
    assert [r[:3] for r in big.results] == ["552", "552"]
    await client.quit()
    await eventually(lambda: gateway.gateway.dispatcher.stats.delivered == 2, what="both copies delivered")

    text = await metrics_text(gateway)
    assert sample(text, "lmtp_gateway_messages_received_total", ingress="lmtp") == 2  # the 552 never arrived whole
    assert sample(text, "lmtp_gateway_accepted_total", mailbox="incoming_email") == 1
    assert sample(text, "lmtp_gateway_accepted_total", mailbox="service_desk_email") == 1
    assert sample(text, "lmtp_gateway_dropped_total", mailbox="incoming_email", reason="auto_generated") == 1
    assert sample(text, "lmtp_gateway_rejected_total", reason="unknown_address") == 1
    assert sample(text, "lmtp_gateway_rejected_total", reason="unknown_key") == 1
    assert sample(text, "lmtp_gateway_rejected_total", reason="too_large") == 2
    assert sample(text, "lmtp_gateway_delivered_total", mailbox="incoming_email", sink="sidekiq") == 1
    assert sample(text, "lmtp_gateway_delivered_total", mailbox="service_desk_email", sink="maildir") == 1
    assert sample(text, "lmtp_gateway_failed_total", mailbox="incoming_email", sink="sidekiq") == 0
    assert sample(text, "lmtp_gateway_deferred_total", mailbox="service_desk_email", sink="maildir") == 0
    labels = {"mailbox": "incoming_email", "sink": "sidekiq"}
    assert sample(text, "lmtp_gateway_delivery_latency_seconds_count", **labels) == 1
    assert sample(text, "lmtp_gateway_delivery_latency_seconds_sum", **labels) > 0  # type: ignore[operator]
    assert sample(text, "lmtp_gateway_delivery_latency_seconds_bucket", **labels, le="+Inf") == 1
    assert sample(text, "lmtp_gateway_journal_pending") == 0
    assert sample(text, "lmtp_gateway_journal_oldest_pending_age_seconds") == 0


async def test_readyz_and_backlog_follow_redis_down_and_back(
    start_gateway: StartGateway, redis: Any, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path / "spool",
        incoming_email={"delivery_method": "sidekiq"},
        service_desk_email={"delivery_method": "sidekiq"},
        redis={"url": redis.url},
        monitoring=MONITORING,
    )
    gateway = await start_gateway(config, backoff_base=0.05, probe_cache_seconds=0.1)
    address = gateway.gateway.ops.address
    ready = await get(address, "/readyz")
    assert (ready.status_code, ready.text) == (200, "ready\n")

    redis.stop()
    down = await answer_becomes(address, "/readyz", 503)
    lines = down.text.splitlines()
    assert len(lines) == 2 and lines[0].startswith("incoming_email (sidekiq): redis: ConnectionError")
    assert lines[1].startswith("service_desk_email (sidekiq): redis: ConnectionError")
    assert (await get(address, "/livez")).status_code == 200  # alive, only not ready

    client = await gateway.client()
    for number in range(3):
        assert (await client.send("a@example.org", [REPLY_RCPT], numbered_message(number))).results[0][:3] == "250"
    await client.quit()
    await eventually(lambda: gateway.gateway.dispatcher.stats.transient >= 3, what="failed attempts")
    text = await metrics_text(gateway)
    assert sample(text, "lmtp_gateway_journal_pending") == 3
    assert sample(text, "lmtp_gateway_deferred_total", mailbox="incoming_email", sink="sidekiq") >= 3  # type: ignore[operator]
    first_age = sample(text, "lmtp_gateway_journal_oldest_pending_age_seconds")
    assert first_age > 0  # type: ignore[operator]
    metrics = gateway.gateway.metrics
    real_clock = metrics.clock
    metrics.clock = lambda: real_clock() + 3600  # an hour on: the age is read against the clock
    later_age = sample(await metrics_text(gateway), "lmtp_gateway_journal_oldest_pending_age_seconds")
    metrics.clock = real_clock
    assert later_age >= first_age + 3600  # type: ignore[operator]

    redis.start()
    await eventually(lambda: gateway.gateway.dispatcher.stats.delivered == 3, what="the 3 entries delivered")
    assert redis.command("LLEN", "queue:default") == 3
    await answer_becomes(address, "/readyz", 200)
    text = await metrics_text(gateway)
    assert sample(text, "lmtp_gateway_journal_pending") == 0
    assert sample(text, "lmtp_gateway_delivered_total", mailbox="incoming_email", sink="sidekiq") == 3
    assert sample(text, "lmtp_gateway_delivery_latency_seconds_count", mailbox="incoming_email", sink="sidekiq") == 3


async def test_readyz_fails_while_the_journal_cannot_be_written(start_gateway: StartGateway, small_disk: Path) -> None:
    spool = small_disk / "spool"
    config = make_config(spool, lmtp={"max_message_size": "1M"}, monitoring=MONITORING)
    gateway = await start_gateway(config, probe_cache_seconds=0)
    address = gateway.gateway.ops.address
    assert (await get(address, "/readyz")).status_code == 200
    remount(small_disk, "ro")
    try:
        down = await get(address, "/readyz")
        assert down.status_code == 503
        assert f"journal: journal file system is read-only: {spool}\n" in down.text
        assert "incoming_email (maildir): maildir" in down.text  # the Maildir lives on the same file system
    finally:
        remount(small_disk, "rw")
    assert (await get(address, "/readyz")).status_code == 200
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (small_disk_free(small_disk) - 512 * 1024))  # leaves less than max_message_size
    full = await get(address, "/readyz")
    assert full.status_code == 503 and "journal: journal disk nearly full: 0 MiB free" in full.text
    filler.unlink()
    assert (await get(address, "/readyz")).status_code == 200


def small_disk_free(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


async def test_readyz_fails_while_gitlab_does_not_answer(start_gateway: StartGateway, tmp_path: Path) -> None:
    key = os.urandom(32)
    gitlab = GitLabStub(key).start()
    secret = mailroom_secret_file(tmp_path, key)
    config = make_config(
        tmp_path / "spool",
        gitlab={"url": gitlab.url},
        incoming_email={"delivery_method": "webhook", "secret_file": str(secret)},
        service_desk_email=None,
        monitoring=MONITORING,
    )
    try:
        gateway = await start_gateway(config, probe_cache_seconds=0)
        address = gateway.gateway.ops.address
        assert (await get(address, "/readyz")).status_code == 200
    finally:
        gitlab.stop()
    down = await get(address, "/readyz")
    assert down.status_code == 503
    assert down.text.startswith(
        f"incoming_email (webhook): webhook: cannot reach {gitlab.url}/api/v4/internal/mail_room/incoming_email: "
        "ConnectError"
    )
    assert not gitlab.received  # probing never POSTs: a POST GitLab accepts is a job


async def test_two_gateways_in_one_process_count_apart(start_gateway: StartGateway, tmp_path: Path) -> None:
    one = await start_gateway(make_config(tmp_path / "one", monitoring=MONITORING))
    two = await start_gateway(make_config(tmp_path / "two", monitoring=MONITORING))
    client = await one.client()
    await client.send("a@example.org", [REPLY_RCPT], numbered_message(1))
    await client.quit()
    await eventually(lambda: one.gateway.dispatcher.stats.delivered == 1, what="delivery")
    labels = {"mailbox": "incoming_email", "sink": "maildir"}
    assert sample(await metrics_text(one), "lmtp_gateway_delivered_total", **labels) == 1
    assert sample(await metrics_text(two), "lmtp_gateway_delivered_total", **labels) == 0


async def test_a_busy_monitoring_port_stops_the_start_naming_the_key(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError) as refused:
            await start_gateway(make_config(tmp_path / "spool", monitoring={"listen": f"127.0.0.1:{port}"}))
    assert str(refused.value) == (
        f"monitoring.listen: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "set monitoring.listen to a free HOST:PORT, or to off"
    )


def test_collector_state_and_collected_counter() -> None:
    metrics = Metrics()
    metrics.set_collector_state("incoming_email", "idle")
    metrics.set_collector_state("incoming_email", "backoff")
    metrics.count_collected("incoming_email", 3)
    text = metrics.render().decode()
    for state in ("connecting", "idle", "fetching", "backoff", "stopped"):
        value = sample(text, "lmtp_gateway_collector_state", mailbox="incoming_email", state=state)
        assert value == (1 if state == "backoff" else 0), state
    assert sample(text, "lmtp_gateway_collected_total", mailbox="incoming_email") == 3
    with pytest.raises(ValueError, match="expected one of connecting, idle, fetching, backoff, stopped"):
        metrics.set_collector_state("incoming_email", "sleeping")


# --- the HTTP responder itself ---


@pytest.fixture
async def ops() -> Any:
    server = OpsServer(Metrics(), _nothing_wrong, timeout=0.5)
    await server.listen("127.0.0.1:0")
    yield server
    await server.close()


async def _nothing_wrong() -> list[str]:
    return []


async def raw_exchange(address: str, data: bytes, *, wait_for_close: float = 30) -> bytes:
    """Send `data` as it is; return everything the server said until it closed."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), wait_for_close)
    writer.close()
    return answer


async def test_routes_methods_and_heads(ops: OpsServer) -> None:
    assert ops.address is not None
    assert (await get(ops.address, "/livez")).text == "ok\n"
    assert (await get(ops.address, "/readyz?verbose=1")).text == "ready\n"
    missing = await get(ops.address, "/")
    assert missing.status_code == 404 and "/metrics" in missing.text
    posted = await get(ops.address, "/metrics", method="POST")
    assert posted.status_code == 405 and posted.headers["allow"] == "GET, HEAD"
    head = await get(ops.address, "/livez", method="HEAD")
    assert head.status_code == 200 and head.headers["content-length"] == "3" and head.content == b""


async def test_garbage_and_oversized_requests_get_4xx(ops: OpsServer) -> None:
    assert ops.address is not None
    for garbage in (
        b"\x16\x03\x01\x02\x00hello\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"get me the metrics please\r\n\r\n",
    ):
        answer = await raw_exchange(ops.address, garbage)
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), garbage
    answer = await raw_exchange(ops.address, b"GET /metrics HTTP/1.1\r\nX-Long: " + b"a" * 10_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    host, _, port = ops.address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"not http at all")
    writer.write_eof()  # and then nothing more
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400 ")
    writer.close()


async def test_a_slow_client_does_not_hold_up_others() -> None:
    server = OpsServer(Metrics(), _nothing_wrong, timeout=600)
    address = await server.listen("127.0.0.1:0")
    host, _, port = address.rpartition(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        await writer.drain()
        assert (await get(address, "/livez")).status_code == 200  # served while the slow one waits
        writer.write(b"\r\n")  # and the slow one is still served when it finishes
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)
        assert answer == b"HTTP/1.1 200 OK\r\n"
        writer.close()
    finally:
        await server.close()


async def test_a_slow_client_is_cut_off_with_408(ops: OpsServer) -> None:
    assert ops.address is not None
    answer = await raw_exchange(ops.address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


async def test_credentials_in_urls_are_never_shown(start_gateway: StartGateway, tmp_path: Path) -> None:
    key = os.urandom(32)
    gitlab = GitLabStub(key).start()
    secret = mailroom_secret_file(tmp_path, key)
    with_password = gitlab.url.replace("://", "://gluser:S3cretPassw0rd@")
    config = make_config(
        tmp_path / "spool",
        gitlab={"url": with_password},
        incoming_email={"delivery_method": "webhook", "secret_file": str(secret)},
        service_desk_email=None,
        monitoring=MONITORING,
    )
    gateway = await start_gateway(config, probe_cache_seconds=0)
    gitlab.stop()
    down = await get(gateway.gateway.ops.address, "/readyz")
    assert down.status_code == 503 and "gluser:***@" in down.text and "S3cretPassw0rd" not in down.text


async def test_damaged_entries_show_in_metrics_and_readyz(start_gateway: StartGateway, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    for state in ("pending", "quarantine"):
        (spool / state).mkdir(parents=True)
    (spool / "pending" / f"{'a' * 24}.json").write_text('{"id": "aa')  # torn metadata of an acknowledged entry
    (spool / "pending" / f"{'a' * 24}.eml").write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    gateway = await start_gateway(make_config(spool, monitoring=MONITORING), probe_cache_seconds=0)
    assert sample(await metrics_text(gateway), "lmtp_gateway_journal_quarantined") == 1
    ready = await get(gateway.gateway.ops.address, "/readyz")
    assert ready.status_code == 200  # mail still flows; an admin is told
    assert ready.text.startswith("ready\nwarning: 1 damaged journal entries set aside")
