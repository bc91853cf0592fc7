"""`lmtp-gateway serve` as a process: graceful SIGTERM, and a 30 MB message against the 25 MB limit."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPLY_RCPT, eventually, message, numbered_message, tmp_leftovers
from tests.lmtp_client import LmtpClient, dot_stuff


async def test_sigterm_finishes_the_transaction_in_flight_then_exits_0(gateway_process: Any, tmp_path: Path) -> None:
    process = gateway_process()
    client = await LmtpClient.connect(process.address)
    await client.lhlo()
    idle = await LmtpClient.connect(process.address)  # a cached Postfix connection doing nothing
    await idle.lhlo()
    client.writer.write(f"MAIL FROM:<a@b>\r\nRCPT TO:<{REPLY_RCPT}>\r\nDATA\r\n".encode())
    for _ in range(3):
        await client.reply()
    wire = dot_stuff(numbered_message(1, body="line\n" * 1000))
    client.writer.write(wire[:2000])
    await client.writer.drain()
    process.process.send_signal(15)
    # the signal has landed once the gateway says it is stopping (it has stopped accepting connections then)
    await eventually(lambda: '"event": "stopping"' in process.log_path.read_text(), what="the gateway stopping")
    client.writer.write(wire[2000:])
    await client.writer.drain()
    assert (await client.reply()).startswith("250 2.0.0")
    assert await asyncio.to_thread(process.process.wait, 30) == 0
    with pytest.raises((ConnectionError, OSError)):
        await LmtpClient.connect(process.address)
    delivered = list((tmp_path / "spool" / "delivered").glob("*.json"))
    assert len(delivered) == 1 and json.loads(delivered[0].read_text())["rcpt"] == REPLY_RCPT


async def test_30_mb_against_25_mb_is_refused_without_buffering(gateway_process: Any, tmp_path: Path) -> None:
    process = gateway_process()
    client = await LmtpClient.connect(process.address)
    await client.lhlo()
    big = message("Subject: big", body=("z" * 998 + "\n") * 30_000)  # 30 MB
    done = await client.send("a@example.org", [REPLY_RCPT, "contact+slug-key@incoming.test"], big)
    assert [r[:9] for r in done.results] == ["552 5.3.4", "552 5.3.4"]
    small = await client.send("a@example.org", [REPLY_RCPT], numbered_message(2))
    assert small.results[0].startswith("250 2.0.0")
    await client.quit()
    assert process.peak_rss_mb() < 200
    await eventually(lambda: list((tmp_path / "spool" / "delivered").glob("*.json")), what="the small one delivered")
    assert not tmp_leftovers(tmp_path / "spool")
    assert process.terminate() == 0


async def test_16_concurrent_10_mb_messages_stay_under_200_mb(gateway_process: Any, redis: Any, tmp_path: Path) -> None:
    process = gateway_process(
        incoming_email={"delivery_method": "sidekiq"},
        service_desk_email={"delivery_method": "sidekiq"},
        redis={"url": redis.url},
    )
    body = "".join(f"{n:07d} " + "y" * 90 + "\n" for n in range(100_000))  # 10 MB of 98-byte lines

    async def send(number: int) -> str:
        client = await LmtpClient.connect(process.address)
        await client.lhlo()
        done = await client.send("a@example.org", [REPLY_RCPT], message(f"Subject: big {number}", body=body))
        await client.quit()
        return done.results[0]

    replies = await asyncio.gather(*(send(n) for n in range(16)))
    assert all(reply.startswith("250 2.0.0") for reply in replies)
    await eventually(lambda: redis.command("LLEN", "queue:default") == 16, timeout=60, what="16 jobs")
    assert process.peak_rss_mb() < 200
    assert process.terminate() == 0
