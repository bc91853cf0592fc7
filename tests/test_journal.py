"""The journal on its own: commit, state changes, recovery after a crash, retention."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from pathlib import Path

import pytest

from lmtp_gateway.errors import JournalError
from lmtp_gateway.intake import Acceptance, Intake
from lmtp_gateway.journal import Entry, Journal, State, envelope_headers, fingerprint
from lmtp_gateway.journal.store import TARGET_NAMED
from tests.conftest import (
    REPLY_RCPT,
    StartGateway,
    draft,
    eventually,
    make_config,
    numbered_message,
    tmp_leftovers,
)


def new_entry(entry_id: str, state: State = State.PENDING, received_at: float | None = None) -> Entry:
    return Entry(
        id=entry_id, fingerprint=entry_id * 2, state=state, received_at=received_at or time.time(), ingress="test",
        mail_from="a@b", rcpt="r@h", mailbox="incoming_email", key="k", handler="create_note", source="to",
        reason="", size=5,
    )  # fmt: skip


async def commit(journal: Journal, entry: Entry, body: bytes = b"hello") -> None:
    await journal.commit([draft(entry, b"", body)])


async def test_commit_makes_a_readable_pair(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    await commit(journal, new_entry("a" * 24))
    assert (tmp_path / "pending" / f"{'a' * 24}.eml").read_bytes() == b"hello"
    assert journal.find("a" * 24) is not None
    assert not tmp_leftovers(tmp_path)
    journal.close()


async def test_state_changes_move_both_files(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    entry = new_entry("b" * 24)
    await commit(journal, entry)
    await journal.move(entry, State.DELIVERED)
    assert {p.name for p in (tmp_path / "delivered").iterdir()} == {f"{'b' * 24}.eml", f"{'b' * 24}.json"}
    assert not list((tmp_path / "pending").iterdir())
    assert journal.find("b" * 24).state is State.DELIVERED
    journal.close()


async def test_recovery_after_crashes_at_every_step(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    half_moved, complete = new_entry("c" * 24), new_entry("e" * 24)
    for entry in (half_moved, complete):
        await commit(journal, entry)
    # a crash between the two renames of a state change: .json in delivered/, .eml still in pending/
    os.replace(tmp_path / "pending" / f"{'c' * 24}.json", tmp_path / "delivered" / f"{'c' * 24}.json")
    # a crash between the two renames of a commit: an .eml without metadata was never acknowledged
    (tmp_path / "pending" / f"{'d' * 24}.eml").write_bytes(b"orphan")
    (tmp_path / "tmp" / "x.data").write_bytes(b"half written")
    journal.close()  # the crash: the process and its hold on the journal are gone
    reopened = Journal(tmp_path)
    assert reopened.open() == 1
    assert [e.id for e in reopened.entries(State.PENDING)] == ["e" * 24]
    assert (tmp_path / "delivered" / f"{'c' * 24}.eml").exists()
    assert not (tmp_path / "pending" / f"{'d' * 24}.eml").exists()
    assert not tmp_leftovers(tmp_path)
    assert not (tmp_path / "quarantine").exists()  # an orphan .eml was never acknowledged: removed, not set aside


async def test_retention_removes_only_old_finished_entries(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    old_done, old_pending, new_done = new_entry("f" * 24), new_entry("0" * 24), new_entry("1" * 24)
    for entry in (old_done, old_pending, new_done):
        await commit(journal, entry)
    await journal.move(old_done, State.DELIVERED)
    await journal.move(new_done, State.DROPPED)
    removed = journal.expire(retention=3600, now=time.time() + 7200)
    assert removed == 2  # both finished entries are older than an hour at that "now"
    assert journal.expire(retention=3600) == 0
    assert [e.id for e in journal.entries()] == ["0" * 24]  # pending is never removed


def test_fingerprint_depends_on_message_mailbox_and_recipient() -> None:
    digest = hashlib.sha256(b"raw").digest()
    base = fingerprint(digest, "incoming_email", "a@b")
    assert base == fingerprint(digest, "incoming_email", "a@b")
    assert len({base, fingerprint(digest, "service_desk_email", "a@b"), fingerprint(digest, "incoming_email", "c@d"),
                fingerprint(hashlib.sha256(b"other").digest(), "incoming_email", "a@b")}) == 4  # fmt: skip


def test_envelope_headers() -> None:
    assert envelope_headers("", "r@h") == b"Return-Path: <>\r\nDelivered-To: r@h\r\n"
    assert envelope_headers(None, None) == b""


async def test_an_entry_cut_short_before_its_sync_is_set_aside(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    short, whole = new_entry("2" * 24), new_entry("3" * 24)
    for entry in (short, whole):
        await commit(journal, entry, body=b"the whole message\r\n")
    with open(tmp_path / "pending" / f"{'2' * 24}.eml", "r+b") as handle:
        handle.truncate(4)  # what a crash before the flush can leave behind
    (tmp_path / "pending" / f"{'4' * 24}.json").write_bytes(b'{"id": "44')  # torn metadata
    (tmp_path / "pending" / f"{'4' * 24}.eml").write_bytes(b"x")
    journal.close()  # the crash
    reopened = Journal(tmp_path)
    assert reopened.open() == 1
    assert [e.id for e in reopened.entries(State.PENDING)] == ["3" * 24]
    assert sorted(p.name for p in (tmp_path / "quarantine").iterdir()) == sorted(
        f"{n * 24}.{ext}" for n in "24" for ext in ("eml", "json")
    )


async def test_syncfs_and_off_commit_too(tmp_path: Path) -> None:
    for method in ("syncfs", "off"):
        journal = Journal(tmp_path / method, sync=method)
        journal.open()
        await commit(journal, new_entry("5" * 24))
        open_before = len(os.listdir("/proc/self/fd"))
        await asyncio.gather(*(commit(journal, new_entry(f"{n:024x}")) for n in range(20)))
        assert journal.find("5" * 24) is not None and journal.find(f"{19:024x}") is not None
        assert len(os.listdir("/proc/self/fd")) == open_before  # every file and syncfs descriptor closed
        journal.close()


async def test_commits_of_one_round_succeed_or_fail_on_their_own(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    spilled = tmp_path / "tmp" / "large.data"  # a large message, streamed to disk while it arrived
    spilled.write_bytes(b"x" * (3 << 20))
    small, large, copy, lost = (new_entry(c * 24) for c in "6789")
    results = await asyncio.gather(
        journal.commit([draft(small, b"Delivered-To: r@h\r\n", b"small")]),
        journal.commit([draft(large, b"", spilled), draft(copy, b"Delivered-To: s@h\r\n", spilled)]),
        journal.commit([draft(lost, b"", tmp_path / "tmp" / "vanished.data")]),
        return_exceptions=True,
    )
    assert results[:2] == [None, None]
    assert isinstance(results[2], JournalError)
    assert not list((tmp_path / "pending").glob(f"{'9' * 24}.*"))
    # the message is stored once: the spilled file itself, linked under both copies' names
    large_eml, copy_eml = (tmp_path / "pending" / f"{c * 24}.eml" for c in "78")
    assert large_eml.stat().st_ino == copy_eml.stat().st_ino == spilled.stat().st_ino
    assert copy_eml.stat().st_nlink == 3
    assert journal.read_message(copy) == b"Delivered-To: s@h\r\n" + b"x" * (3 << 20)
    assert copy.stored_size == 3 << 20
    journal.close()
    reopened = Journal(tmp_path)
    assert reopened.open() == 3
    assert sorted(e.id for e in reopened.entries(State.PENDING)) == [c * 24 for c in "678"]  # whole: nothing set aside
    assert not (tmp_path / "quarantine").exists()
    reopened.close()


async def test_serve_removes_expired_entries_by_itself(tmp_path: Path, start_gateway: StartGateway) -> None:
    """Retention runs in the daemon (at start, then hourly), without anyone calling it."""
    spool = tmp_path / "spool"
    journal = Journal(spool)
    journal.open()
    old, recent = new_entry("7" * 24, received_at=time.time() - 7200), new_entry("8" * 24)
    for entry in (old, recent):
        await commit(journal, entry)
        await journal.move(entry, State.DELIVERED)
    old.finished_at = time.time() - 7200  # delivered two hours ago
    await journal.update(old)
    journal.close()
    running = await start_gateway(make_config(spool, spool={"path": str(spool), "retention": "1h"}))
    await eventually(lambda: not (spool / "delivered" / f"{old.id}.json").exists(), what="the expired entry gone")
    assert (spool / "delivered" / f"{recent.id}.eml").exists()
    assert [e.id for e in running.gateway.journal.entries()] == [recent.id]


async def test_a_closed_journal_refuses_at_once(tmp_path: Path) -> None:
    """After close() (shutdown) a late commit gets a JournalError (452), not an answer that never comes."""
    journal = Journal(tmp_path)
    journal.open()
    await commit(journal, new_entry("9" * 24))
    journal.close()
    with pytest.raises(JournalError, match="closed"):
        await asyncio.wait_for(commit(journal, new_entry("a" * 24)), 5)
    assert not list((tmp_path / "pending").glob(f"{'a' * 24}.*"))


async def test_a_retry_finds_what_an_earlier_version_named_by_the_copy_within_the_retention(tmp_path: Path) -> None:
    """Deliveries are named by their GitLab target; an earlier version named them by the copy. A journal of
    that version is still searched by the copy's name for as long as finished entries are kept, and only then."""
    spool, raw, retention = tmp_path / "spool", numbered_message(7), 7 * 86400
    received, routing = Intake.received(raw), make_config(spool).routing

    async def accept(journal: Journal) -> Acceptance:
        (acceptance,) = await Intake(routing, journal, None, retry_horizon=retention).accept(
            received, "a@example.org", [REPLY_RCPT], ingress="test"
        )
        return acceptance

    fresh = Journal(spool)
    fresh.open()
    assert fresh.target_named_since == 0.0 and not fresh.copy_named(time.time() - retention)
    first = await accept(fresh)
    assert first.entry is not None and not first.duplicate
    fresh.close()

    # The same entry as an earlier version left it: named by the copy, no marker.
    copy_name = fingerprint(received.digest, "incoming_email", REPLY_RCPT)
    for suffix in (".json", ".eml"):
        os.replace(spool / "pending" / f"{first.entry.id}{suffix}", spool / "delivered" / f"{copy_name[:24]}{suffix}")
    metadata = spool / "delivered" / f"{copy_name[:24]}.json"
    metadata.write_bytes(metadata.read_bytes().replace(first.entry.fingerprint.encode(), copy_name.encode()))
    metadata.write_bytes(metadata.read_bytes().replace(first.entry.id.encode(), copy_name[:24].encode()))
    (spool / TARGET_NAMED).unlink()

    upgraded = Journal(spool)
    assert upgraded.copy_named(time.time() - retention)  # not opened yet: nobody can tell
    upgraded.open()
    assert 0 < upgraded.target_named_since <= time.time()
    retry = await accept(upgraded)
    assert retry.duplicate and retry.entry is not None and retry.entry.id == copy_name[:24]
    assert not upgraded.ids(State.PENDING)
    upgraded.close()

    # Past the retention, no retry can still be on its way: the copy's name is no longer searched.
    (spool / TARGET_NAMED).write_text(f"{time.time() - retention - 60}\n")
    later = Journal(spool)
    later.open()
    assert not later.copy_named(time.time() - retention)
    again = await accept(later)
    assert not again.duplicate and later.ids(State.PENDING) == [first.entry.id]
    later.close()


async def test_a_full_disk_at_start_up_leaves_the_search_by_the_copy_on(small_disk: Path) -> None:
    """Recording when deliveries began to be named by target needs a file; a full disk must not keep the journal
    from opening (the backlog is still delivered), and without the record every name is still searched."""
    spool = small_disk / "spool"
    journal = Journal(spool)
    journal.open()
    await commit(journal, new_entry("f" * 24))  # an entry of an earlier version: no marker beside it
    journal.close()
    (spool / TARGET_NAMED).unlink()
    filler = small_disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as handle:
        while True:
            handle.write(b"\0" * 65536)
    reopened = Journal(spool)
    assert reopened.open() == 1
    assert not (spool / TARGET_NAMED).exists() and reopened.copy_named(time.time())
    assert not tmp_leftovers(spool)
    reopened.close()
    filler.unlink()
    again = Journal(spool)
    again.open()
    assert 0 < again.target_named_since <= time.time()
    again.close()
