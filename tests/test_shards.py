"""Journal shards: one per worker under spool.path; shards nobody owns any more are merged without loss."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lmtp_gateway.errors import JournalError
from lmtp_gateway.journal import Entry, Journal, State
from lmtp_gateway.journal.shards import merge_orphans, shard_root, shard_roots
from tests.conftest import draft, tmp_leftovers


def entry(entry_id: str, state: State = State.PENDING) -> Entry:
    return Entry(
        id=entry_id, fingerprint=entry_id * 2, state=state, received_at=time.time(), ingress="test",
        mail_from="a@b", rcpt="r@h", mailbox="incoming_email", key="k", handler="create_note", source="to",
        reason="", size=5,
    )  # fmt: skip


async def seed(root: Path, *entries: Entry, body: bytes = b"Subject: x\r\n\r\nbody\r\n") -> None:
    journal = Journal(root)
    journal.ensure_layout()
    await journal.commit([draft(e, b"Delivered-To: r@h\r\n", body + e.id.encode()) for e in entries])
    journal.close()


def test_worker_zero_keeps_the_single_process_layout(tmp_path: Path) -> None:
    assert shard_root(tmp_path, 0) == tmp_path and shard_root(tmp_path, 2) == tmp_path / "shard-2"
    for name in ("shard-10", "shard-2", "shard-0", "shard-x", "maildir"):
        (tmp_path / name).mkdir()
    assert shard_roots(tmp_path) == [tmp_path, tmp_path / "shard-2", tmp_path / "shard-10"]


async def test_shards_beyond_the_workers_are_merged_with_every_entry_whole(tmp_path: Path) -> None:
    await seed(tmp_path, entry("a" * 24))
    deferred = entry("b" * 24, State.DEFERRED)
    deferred.next_attempt_at = time.time() + 3600
    await seed(shard_root(tmp_path, 1), entry("c" * 24), deferred, entry("d" * 24, State.DELIVERED))
    due = deferred.next_attempt_at
    os.utime(shard_root(tmp_path, 1) / "deferred" / f"{'b' * 24}.json", (due, due))  # its retry time, as deferred
    await seed(shard_root(tmp_path, 2), entry("e" * 24, State.FAILED), entry("f" * 24, State.DROPPED))
    quarantine = shard_root(tmp_path, 2) / "quarantine"
    quarantine.mkdir()
    (quarantine / f"{'9' * 24}.eml").write_bytes(b"damaged")

    assert await merge_orphans(tmp_path, 1) == 5
    assert shard_roots(tmp_path) == [tmp_path]
    journal = Journal(tmp_path)
    states = {e.id[0]: e.state for e in journal.entries()}
    assert states == {"a": State.PENDING, "b": State.DEFERRED, "c": State.PENDING, "d": State.DELIVERED,
                      "e": State.FAILED, "f": State.DROPPED}  # fmt: skip
    for found in journal.entries():
        assert journal.read_message(found).endswith(found.id.encode())  # checked against its checksum
    due = os.stat(tmp_path / "deferred" / f"{'b' * 24}.json").st_mtime
    assert due == pytest.approx(deferred.next_attempt_at)  # still waits for its retry
    assert (tmp_path / "quarantine" / f"{'9' * 24}.eml").read_bytes() == b"damaged"  # still set aside
    assert not tmp_leftovers(tmp_path)


async def test_two_workers_to_three_and_back(tmp_path: Path) -> None:
    await seed(shard_root(tmp_path, 2), entry("1" * 24), entry("2" * 24))
    assert await merge_orphans(tmp_path, 3) == 0  # shard 2 has its worker
    assert await merge_orphans(tmp_path, 2) == 2  # shard 2 % 2 = 0
    assert sorted(Journal(tmp_path).ids(State.PENDING)) == ["1" * 24, "2" * 24]


async def test_an_entry_in_both_after_a_crash_is_kept_once(tmp_path: Path) -> None:
    """A crash after the target's commit, before the source's files went: the next merge keeps the target's."""
    delivered = entry("7" * 24, State.DELIVERED)
    await seed(tmp_path, delivered)
    await seed(shard_root(tmp_path, 1), entry("7" * 24))
    assert await merge_orphans(tmp_path, 1) == 0
    (kept,) = Journal(tmp_path).entries()
    assert kept.state is State.DELIVERED  # not delivered a second time
    assert not shard_root(tmp_path, 1).exists()


async def test_a_damaged_entry_is_set_aside_not_merged(tmp_path: Path) -> None:
    await seed(shard_root(tmp_path, 1), entry("5" * 24), entry("6" * 24))
    with open(shard_root(tmp_path, 1) / "pending" / f"{'5' * 24}.eml", "r+b") as handle:
        handle.truncate(3)
    assert await merge_orphans(tmp_path, 1) == 1
    assert Journal(tmp_path).ids(State.PENDING) == ["6" * 24]
    assert shard_roots(tmp_path) == [tmp_path]  # set aside in the shard that remains, for an admin to look at
    assert sorted(p.name for p in (tmp_path / "quarantine").iterdir()) == [f"{'5' * 24}.eml", f"{'5' * 24}.json"]


async def test_a_shard_still_in_use_is_not_merged(tmp_path: Path) -> None:
    await seed(shard_root(tmp_path, 1), entry("8" * 24))
    running = Journal(shard_root(tmp_path, 1))
    running.open()  # a worker of a previous run still alive
    try:
        with pytest.raises(JournalError, match="in use by another lmtp-gateway process"):
            await merge_orphans(tmp_path, 1)
    finally:
        running.close()
    assert Journal(shard_root(tmp_path, 1)).ids(State.PENDING) == ["8" * 24]
