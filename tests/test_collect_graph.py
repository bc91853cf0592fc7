"""`collect` from Microsoft Graph, against a local stand-in for its documented REST contract."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lmtp_gateway.collectors import graph as graph_collector
from lmtp_gateway.config import Config
from lmtp_gateway.journal import Journal, State
from lmtp_gateway.service import Gateway
from tests.conftest import make_config, numbered_message
from tests.graph_stub import GraphStub
from tests.test_collect_imap import subjects
from tests.test_sidekiq import jobs


@pytest.fixture
def graph() -> Iterator[GraphStub]:
    stub = GraphStub().start()
    try:
        yield stub
    finally:
        stub.stop()


def graph_config(spool: Path, graph: GraphStub, redis: Any, **extra: Any) -> Config:
    options = {
        "tenant_id": graph.tenant,
        "client_id": graph.client_id,
        "client_secret": graph.client_secret,
        "azure_ad_endpoint": graph.login_endpoint,
        "graph_endpoint": graph.graph_endpoint,
        **extra.pop("inbox_options", {}),
    }
    return make_config(
        spool,
        incoming_email={
            "address": "incoming+%{key}@incoming.test",
            "user": graph.user,
            "inbox_method": "microsoft_graph",
            "inbox_options": options,
            "delivery_method": "sidekiq",
            **extra,
        },
        service_desk_email=None,
        redis={"url": redis.url},
    )


async def collect_once(config: Config) -> Any:
    return await Gateway(config, listen=False, collect=True).collect_once()


async def test_drains_every_page_and_marks_only_journaled_mail_read(
    graph: GraphStub, redis: Any, tmp_path: Path
) -> None:
    for number in range(120):
        graph.add(numbered_message(number))
    report = await collect_once(graph_config(tmp_path / "spool", graph, redis, delete_after_delivery=False))
    assert report.errors == {} and report.collected == {"incoming_email": 120} and report.pending == 0
    assert subjects(redis) == Counter(range(120))
    assert graph.unread() == [] and len(graph.messages) == 120
    assert graph.token_requests == 1
    listed = [path for _, method, path in graph.requests if method == "GET" and path.endswith("skip=10")]
    assert listed, "the collector did not follow @odata.nextLink"
    delivered = list(Journal(tmp_path / "spool").entries(State.DELIVERED))
    assert {e.ingress for e in delivered} == {"graph:incoming_email"}


async def test_delete_after_delivery_deletes(graph: GraphStub, redis: Any, tmp_path: Path) -> None:
    for number in range(5):
        graph.add(numbered_message(number))
    report = await collect_once(graph_config(tmp_path / "spool", graph, redis, delete_after_delivery=True))
    assert report.collected == {"incoming_email": 5}
    assert graph.messages == {}
    assert subjects(redis) == Counter(range(5))


async def test_at_most_four_requests_at_once(graph: GraphStub, redis: Any, tmp_path: Path) -> None:
    graph.latency = 0.05
    for number in range(30):
        graph.add(numbered_message(number))
    report = await collect_once(graph_config(tmp_path / "spool", graph, redis))
    assert report.collected == {"incoming_email": 30}
    assert 1 < graph.max_in_flight <= 4


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured(
    status: int, graph: GraphStub, redis: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for number in range(3):
        graph.add(numbered_message(number))
    graph.throttle, graph.throttle_status = [7, 2], status
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:  # what the collector waits, without waiting it
        slept.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(graph_collector.asyncio, "sleep", sleep)
    report = await collect_once(graph_config(tmp_path / "spool", graph, redis))
    assert report.errors == {} and report.collected == {"incoming_email": 3}
    assert slept[:2] == [7, 2]  # as Graph said, not the collector's own backoff


async def test_an_expired_token_is_renewed_and_the_request_repeated(
    graph: GraphStub, redis: Any, tmp_path: Path
) -> None:
    """A token revoked or expired early (as Entra ID may do): Graph answers 401, the collector fetches a new token
    and repeats the request, on the same connection, without an error reaching the loop above it."""
    graph.add(numbered_message(1))
    (collector,) = Gateway(graph_config(tmp_path / "spool", graph, redis), listen=False, collect=True).collectors
    source = collector.source
    await source.connect()
    try:
        assert len(await source.pending(10)) == 1
        graph.expire_tokens()
        assert len(await source.pending(10)) == 1
    finally:
        await source.close()
    assert (graph.unauthorized, graph.token_requests) == (1, 2)


async def test_a_token_is_renewed_before_it_expires(graph: GraphStub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five minutes early, or half-way through a short-lived token: no request meets a 401 for expiry. The
    collector's clock is a fake one here, so the test needs no waiting."""
    clock = [1000.0]
    monkeypatch.setattr(graph_collector, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    scope = f"{graph.graph_endpoint}/.default"
    credentials = graph_collector.ClientCredentials(
        None, graph.login_endpoint, graph.tenant, graph.client_id, graph.client_secret, scope
    )
    for expires_in, renewed_after in ((3600, 3300), (120, 60)):
        graph.expires_in = expires_in
        credentials.forget()
        first = await credentials()
        requests = graph.token_requests
        clock[0] += renewed_after - 1
        assert await credentials() == first and graph.token_requests == requests
        clock[0] += 1
        assert await credentials() != first and graph.token_requests == requests + 1


async def test_poll_interval_is_the_graph_collectors_clock(
    graph: GraphStub, redis: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five minutes between looks, as configured, although IMAP's idle_timeout (60 s by default) is shorter."""
    config = graph_config(tmp_path / "spool", graph, redis, inbox_options={"poll_interval": 300})
    (collector,) = Gateway(config, listen=False, collect=True).collectors
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(graph_collector.asyncio, "sleep", sleep)
    await collector.source.wait(collector.wait_seconds)
    assert slept == [300]


async def test_a_wrong_client_secret_is_reported_without_the_secret(
    graph: GraphStub, redis: Any, tmp_path: Path
) -> None:
    graph.add(numbered_message(1))
    report = await collect_once(
        graph_config(tmp_path / "spool", graph, redis, inbox_options={"client_secret": "wrong-secret-xyz"})
    )
    problem = report.errors["incoming_email"]
    assert "401" in problem and "AADSTS7000215" in problem and "wrong-secret-xyz" not in problem
    assert len(graph.unread()) == 1  # nothing touched


def test_graph_settings_missing_say_which(tmp_path: Path) -> None:
    from lmtp_gateway.collect import build_source
    from lmtp_gateway.errors import ConfigError

    config = make_config(
        tmp_path / "spool",
        incoming_email={"user": "gitlab@example.com", "inbox_method": "microsoft_graph", "inbox_options": {}},
        service_desk_email=None,
    )
    with pytest.raises(ConfigError, match=r"inbox_options.tenant_id, inbox_options.client_id"):
        build_source(config, config.mailboxes["incoming_email"], tmp_path)


async def test_a_full_journal_disk_leaves_mail_unread_then_collects_it_once(
    graph: GraphStub, redis: Any, small_disk: Path
) -> None:
    """A message is marked read (or deleted) only once it is in the journal: when the commit fails, Graph keeps it
    unread, and the next run collects it, once."""
    config = graph_config(small_disk / "spool", graph, redis, delete_after_delivery=False)
    await collect_once(config)  # the journal exists
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * (1 << 20))
    for number in range(5):
        graph.add(numbered_message(number))
    report = await collect_once(config)
    assert "disk full" in report.errors["incoming_email"]
    assert len(graph.unread()) == 5 and not jobs(redis)
    filler.unlink()
    report = await collect_once(config)
    assert report.errors == {} and report.collected == {"incoming_email": 5}
    assert subjects(redis) == Counter(range(5)) and graph.unread() == []
