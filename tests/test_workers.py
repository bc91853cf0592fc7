"""`serve --workers N`, as a real process tree: shared listeners, one journal shard per worker, restarts, drain,
monitoring for all, and a Postfix retry that reaches the other worker still makes one delivery."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmtp_gateway.journal import State
from lmtp_gateway.journal.shards import shard_root
from tests.conftest import REPLY_RCPT, GatewayProcess, eventually, lmtp_gateway_command, mailroom_secret_file
from tests.conftest import numbered_message as numbered
from tests.gitlab_stub import GitLabStub
from tests.lmtp_client import LmtpClient, dot_stuff
from tests.servers import free_port
from tests.test_sidekiq import jobs

TWO = {"lmtp": {"workers": 2}}


def subject_number(raw: bytes | str) -> int:
    text = raw.decode() if isinstance(raw, bytes) else raw
    found = re.search(r"Subject: message (\d+)", text)
    assert found, text[:200]
    return int(found[1])


def shard_ids(spool: Path, index: int, *states: State) -> list[str]:
    root = shard_root(spool, index)
    return [p.stem for state in states or tuple(State) for p in (root / state.value).glob("*.json")]


async def send_one(address: str, number: int) -> str:
    client = await LmtpClient.connect(address)
    try:
        await client.lhlo()
        done = await client.send("a@example.org", [REPLY_RCPT], numbered(number))
        return done.results[0]
    finally:
        await client.quit()


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """SIGSTOP a worker: it accepts nothing, so every new connection goes to the others."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def worker_pids(process: GatewayProcess) -> dict[int, int] | None:
    """Worker index -> pid of the running workers, from the supervisor's log; None until both are ready."""
    found: dict[int, int] = {}
    for index, pid in re.findall(r'"message": "worker (\d+) ready \(pid (\d+)\)"', process.log_path.read_text()):
        found[int(index)] = int(pid)
    running = set(process.workers())
    found = {index: pid for index, pid in found.items() if pid in running}
    return found if len(found) == 2 else None


def monitoring(**extra: Any) -> dict[str, Any]:
    return {"monitoring": {"listen": f"127.0.0.1:{free_port()}"}, **extra}


def metric(text: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{re.escape('{' + wanted + '}') if labels else ''} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found[1]) if found else None


async def test_workers_share_the_listener_each_with_its_shard(
    gateway_process: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    ops = monitoring()
    process = gateway_process(**TWO, **ops)
    spool = tmp_path / "spool"
    pids = await eventually(lambda: worker_pids(process), what="two workers")
    with paused(pids[0]):
        assert (await send_one(process.address, 1)).startswith("250 2.0.0")
    with paused(pids[1]):
        assert (await send_one(process.address, 2)).startswith("250 2.0.0")
    for number in range(3, 21):
        assert (await send_one(process.address, number)).startswith("250 2.0.0")
    delivered = await eventually(
        lambda: len(shard_ids(spool, 0, State.DELIVERED)) + len(shard_ids(spool, 1, State.DELIVERED)) == 20,
        what="20 deliveries",
    )
    assert delivered
    assert shard_ids(spool, 0) and shard_ids(spool, 1)  # each worker wrote its own journal
    maildir = spool / "maildir" / "incoming_email" / "new"
    assert sorted(subject_number(p.read_bytes()) for p in maildir.iterdir()) == list(range(1, 21))

    address = ops["monitoring"]["listen"]
    text = httpx.get(f"http://{address}/metrics", timeout=30).text
    assert metric(text, "lmtp_gateway_accepted_total", mailbox="incoming_email") == 20  # both workers, added up
    assert metric(text, "lmtp_gateway_workers_running") == 2
    assert metric(text, "lmtp_gateway_journal_pending") == 0
    assert httpx.get(f"http://{address}/readyz", timeout=30).text == "ready\n"
    listed = subprocess.run(
        [*lmtp_gateway_command(), "spool", "stats", "--json", "--config", str(process.config_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    stats = json.loads(listed.stdout)
    assert (stats["shards"], stats["delivered"]) == (2, 20)
    assert "2 shards, one per worker" in listed.stderr
    assert process.terminate() == 0


@pytest.mark.parametrize("delivery", ["maildir", "webhook"])
async def test_a_retry_that_reaches_the_other_worker_is_delivered_once(
    gateway_process: Callable[..., GatewayProcess], tmp_path: Path, delivery: str
) -> None:
    """Postfix sends a message again (it saw no answer) and the other worker takes the connection: it finds the
    entry in the first worker's shard. Redis guards Sidekiq jobs by itself; webhook and Maildir rely on this."""
    gitlab = GitLabStub(b"k" * 32).start()
    try:
        sink: dict[str, Any] = {"delivery_method": delivery}
        if delivery == "webhook":
            sink["secret_file"] = str(mailroom_secret_file(tmp_path, b"k" * 32))
        process = gateway_process(**TWO, gitlab={"url": gitlab.url}, incoming_email=sink)
        spool = tmp_path / "spool"
        pids = await eventually(lambda: worker_pids(process), what="two workers")
        first_reply = await send_one(process.address, 7)
        assert first_reply.startswith("250 2.0.0")
        owner = 0 if shard_ids(spool, 0) else 1
        with paused(pids[owner]):
            again = await send_one(process.address, 7)
        assert again.startswith("250 2.0.0") and again.endswith("already queued"), again
        assert not shard_ids(spool, 1 - owner)  # the other worker kept nothing of its own
        if delivery == "maildir":
            maildir = spool / "maildir" / "incoming_email" / "new"
            await eventually(lambda: len(list(maildir.iterdir())) == 1, what="the delivery")
        else:
            await eventually(lambda: len(gitlab.received) == 1, what="the webhook call")
        await eventually(lambda: shard_ids(spool, owner, State.DELIVERED), what="delivered")
        assert process.terminate() == 0
        if delivery == "maildir":
            assert len(list(maildir.iterdir())) == 1
        else:
            assert len(gitlab.received) == 1
    finally:
        gitlab.stop()


async def test_a_worker_killed_under_load_is_restarted_and_nothing_is_lost(
    gateway_process: Callable[..., GatewayProcess], redis: Any
) -> None:
    ops = monitoring()
    sections = {"incoming_email": {"delivery_method": "sidekiq"}, "redis": {"url": redis.url}}
    process = gateway_process(**TWO, **ops, **sections)
    pids = await eventually(lambda: worker_pids(process), what="two workers")
    acknowledged: set[int] = set()
    numbers = iter(range(100_000))

    async def session() -> None:
        while len(acknowledged) < 400:
            number = next(numbers)
            try:
                if (await send_one(process.address, number)).startswith("250 2.0.0"):
                    acknowledged.add(number)
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                pass  # the killed worker's connection: Postfix would try again; this message was not acknowledged

    sending = asyncio.gather(*(session() for _ in range(4)))
    await eventually(lambda: len(acknowledged) >= random.randint(50, 150), what="load")
    index = random.choice([0, 1])
    victim = pids[index]
    os.kill(victim, signal.SIGKILL)
    def restarted() -> bool:
        ready = worker_pids(process)
        return ready is not None and victim not in ready.values()

    await eventually(restarted, what="the worker restarted and ready")
    await sending
    await eventually(lambda: len(jobs(redis)) >= len(acknowledged), timeout=60, what="every job")
    delivered = Counter(subject_number(job["args"][0]) for job in jobs(redis))
    assert acknowledged <= set(delivered), f"lost: {sorted(acknowledged - set(delivered))[:10]}"
    assert set(delivered.values()) == {1}, "a message was pushed twice"
    text = httpx.get(f"http://{ops['monitoring']['listen']}/metrics", timeout=30).text
    assert metric(text, "lmtp_gateway_worker_restarts_total") == 1
    log = process.log_path.read_text()
    assert re.search(rf'"worker {index} killed by SIGKILL; restarting', log)
    assert process.terminate() == 0


async def test_sigterm_lets_a_transaction_in_data_finish(gateway_process: Callable[..., GatewayProcess]) -> None:
    process = gateway_process(**TWO)
    await eventually(lambda: worker_pids(process), what="two workers")
    client = await LmtpClient.connect(process.address)
    await client.lhlo()
    assert (await client.command("MAIL FROM:<a@example.org>")).startswith("250")
    assert (await client.command(f"RCPT TO:<{REPLY_RCPT}>")).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    wire = dot_stuff(numbered(1))
    client.writer.write(wire[:20])
    await client.writer.drain()
    process.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    await eventually(lambda: '"event": "stopping", "worker"' in process.log_path.read_text(), what="workers stopping")
    client.writer.write(wire[20:])
    assert (await client.reply()).startswith("250 2.0.0")
    assert await asyncio.to_thread(process.process.wait, 60) == 0  # type: ignore[union-attr]


async def test_workers_die_with_a_killed_supervisor(
    gateway_process: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    process = gateway_process(**TWO)
    pids = await eventually(lambda: worker_pids(process), what="two workers")
    process.kill()
    await eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids.values()), what="workers gone")
    process.start()  # the listener and the journals are free again
    assert (await send_one(process.address, 1)).startswith("250 2.0.0")
    assert process.terminate() == 0


async def test_fewer_workers_take_over_the_shards_of_a_run_with_more(
    gateway_process: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gitlab_down = {"gitlab": {"url": f"http://127.0.0.1:{free_port()}"}}
    webhook = {"delivery_method": "webhook", "secret_file": str(mailroom_secret_file(tmp_path, b"k" * 32))}
    process = gateway_process(**TWO, **gitlab_down, incoming_email=webhook)
    spool = tmp_path / "spool"
    pids = await eventually(lambda: worker_pids(process), what="two workers")
    with paused(pids[0]):
        assert (await send_one(process.address, 1)).startswith("250 2.0.0")  # worker 1: shard-1, GitLab down
    assert shard_ids(spool, 1, State.PENDING, State.DEFERRED)
    assert process.terminate() == 0

    gitlab = GitLabStub(b"k" * 32).start()
    try:
        config = process.config_path.read_text().replace(gitlab_down["gitlab"]["url"], gitlab.url)
        process.config_path.write_text(config.replace("workers: 2", "workers: 1"))
        process.start()
        await eventually(lambda: len(gitlab.received) == 1, what="the merged entry delivered")
        assert subject_number(gitlab.received[0].body) == 1
        assert not shard_root(spool, 1).exists()
        assert process.terminate() == 0
    finally:
        gitlab.stop()


async def test_readyz_names_the_worker_and_what_is_wrong(gateway_process: Callable[..., GatewayProcess]) -> None:
    ops = monitoring()
    dead_redis = {
        "incoming_email": {"delivery_method": "sidekiq"},
        "redis": {"url": f"redis://127.0.0.1:{free_port()}"},
    }
    process = gateway_process(**TWO, **ops, **dead_redis)
    address = ops["monitoring"]["listen"]

    def not_ready() -> list[str] | None:
        answer = httpx.get(f"http://{address}/readyz", timeout=30)
        assert answer.status_code == 503, answer.text  # never ready: Redis is not there
        lines = answer.text.splitlines()
        problem = "worker {}: incoming_email (sidekiq): redis: ConnectionError"
        both = all(any(line.startswith(problem.format(i)) for line in lines) for i in (0, 1))
        return lines if both else None  # until both workers have probed Redis once

    assert await eventually(not_ready, what="both workers' problem in /readyz")
    assert httpx.get(f"http://{address}/livez", timeout=30).status_code == 200
    assert process.terminate() == 0
