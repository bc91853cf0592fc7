"""A long Redis outage: 200 000 messages wait in the journal and the gateway's memory stays flat; when Redis is
back, every one of them becomes exactly one job.

The journal is filled directly (as after a day of mail with Redis down: filling it over LMTP would only make the
test slower); then a real `lmtp-gateway serve` process tries each entry, defers it, and keeps at most its active
window in memory. Its peak RSS (VmHWM) is read from /proc.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Any

from lmtp_gateway.journal import Draft, Entry, Journal, State
from tests.conftest import REPLY_KEY, REPLY_RCPT, GatewayProcess, eventually

QUEUED = int(os.environ.get("LMTP_GATEWAY_OUTAGE_MESSAGES", "200000"))
PEAK_RSS_MB = 150  # what the README states for a worker with a backlog of this size

# Every job in the queue, its jid, counted distinct inside Redis: 200 000 jobs are not worth copying out.
DISTINCT_JIDS = """
local seen, count, total = {}, 0, redis.call('LLEN', KEYS[1])
for start = 0, total - 1, 5000 do
  for _, job in ipairs(redis.call('LRANGE', KEYS[1], start, start + 4999)) do
    local jid = cjson.decode(job)['jid']
    if not seen[jid] then seen[jid] = true; count = count + 1 end
  end
end
return {total, count}
"""


async def fill(spool: Path, count: int) -> None:
    """`count` pending entries of small, distinct messages, committed as the gateway commits them."""
    journal = Journal(spool, sync="off")
    journal.ensure_layout()
    prefix = f"Return-Path: <a@example.org>\r\nDelivered-To: {REPLY_RCPT}\r\n".encode()
    now = time.time()
    for start in range(0, count, 2000):
        drafts = []
        for number in range(start, min(count, start + 2000)):
            body = f"From: a@example.org\r\nTo: {REPLY_RCPT}\r\nSubject: message {number}\r\n\r\nHello\r\n".encode()
            entry = Entry(
                id=f"{number:024x}", fingerprint=hashlib.sha256(body).hexdigest(), state=State.PENDING,
                received_at=now, ingress="lmtp", mail_from="a@example.org", rcpt=REPLY_RCPT,
                mailbox="incoming_email", key=REPLY_KEY, handler="create_note", source="to", reason="", size=len(body),
            )  # fmt: skip
            drafts.append(Draft(entry, prefix, body, hashlib.sha256(body).digest()))
        await journal.commit(drafts)
    journal.close()


def count(directory: Path) -> int:
    with os.scandir(directory) as listing:
        return sum(1 for item in listing if item.name.endswith(".json"))


async def test_two_hundred_thousand_queued_keep_memory_flat_and_go_once(
    gateway_process: Any, redis: Any, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    began = time.monotonic()
    await fill(spool, QUEUED)
    filled = time.monotonic()
    redis.stop()
    sections = {"incoming_email": {"delivery_method": "sidekiq"}, "redis": {"url": redis.url}}
    process: GatewayProcess = gateway_process(**sections)
    # Every entry tried once against the dead Redis and parked in deferred/ with its retry time.
    await eventually(
        lambda: count(spool / "deferred") == QUEUED, timeout=600, what=f"{QUEUED} entries deferred", interval=1
    )
    during = process.peak_rss_mb()
    deferred = time.monotonic()

    redis.start()
    await eventually(
        lambda: redis.command("LLEN", "queue:default") >= QUEUED, timeout=600, what=f"{QUEUED} jobs", interval=1
    )
    await eventually(lambda: count(spool / "delivered") == QUEUED, timeout=60, what="all entries delivered")
    total, distinct = await asyncio.to_thread(redis.command, "EVAL", DISTINCT_JIDS, "1", "queue:default")
    assert (total, distinct) == (QUEUED, QUEUED)  # every message one job, none twice
    peak = process.peak_rss_mb()
    print(f"\n{QUEUED} queued: peak RSS {during:.0f} MB while Redis was down, {peak:.0f} MB overall; "
          f"filled in {filled - began:.0f} s, deferred in {deferred - filled:.0f} s, "
          f"delivered in {time.monotonic() - deferred:.0f} s")  # fmt: skip
    assert peak < PEAK_RSS_MB
    assert process.terminate() == 0
