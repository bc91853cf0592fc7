"""`replay` and `spool`, run as an admin runs them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmtp_gateway import dispatch
from lmtp_gateway.journal import Entry, Journal, State
from tests.conftest import (
    REPLY_RCPT,
    StartGateway,
    draft,
    eventually,
    gateway_yaml,
    lmtp_gateway_command,
    make_config,
    numbered_message,
)
from tests.servers import free_port


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*lmtp_gateway_command(), *args], capture_output=True, text=True, timeout=120, check=False)


def config_file(tmp_path: Path, **sections: Any) -> str:
    path = tmp_path / "gw.yml"
    path.write_text(yaml.safe_dump(gateway_yaml(tmp_path / "spool", **sections)))
    return str(path)


async def seed(spool: Path, state: State, count: int, mailbox: str = "incoming_email") -> list[Entry]:
    journal = Journal(spool)
    journal.open()
    made = []
    for number in range(count):
        entry_id = f"{state.value[:1]}{mailbox[:1]}{number:022x}"
        entry = Entry(
            id=entry_id, fingerprint=entry_id * 2, state=State.PENDING, received_at=time.time() - 60, ingress="test",
            mail_from="a@b", rcpt=REPLY_RCPT, mailbox=mailbox, key="k", handler="create_note", source="envelope",
            reason="", size=10,
        )  # fmt: skip
        await journal.commit([draft(entry, b"", numbered_message(number))])
        if state is not State.PENDING:
            entry.last_error = "GitLab said no" if state is State.FAILED else None
            await journal.move(entry, state)
        made.append(entry)
    journal.close()
    return made


async def test_replay_failed_entries_after_the_cause_is_fixed(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    await seed(tmp_path / "spool", State.FAILED, 3)
    await seed(tmp_path / "spool", State.DELIVERED, 2)
    dry = cli("replay", "--config", config, "--state", "failed", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.count("would deliver") == 3
    # they were received a minute ago: not before two minutes ago, all of them before 30 seconds ago
    earlier = cli("replay", "--config", config, "--state", "failed", "--until", "2m", "--dry-run")
    assert earlier.returncode == 0 and "would deliver" not in earlier.stdout
    later = cli("replay", "--config", config, "--state", "failed", "--until", "30s", "--dry-run")
    assert later.stdout.count("would deliver") == 3
    assert len(list((tmp_path / "spool" / "failed").glob("*.json"))) == 3  # a dry run changes nothing
    done = cli("replay", "--config", config, "--state", "failed")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("delivered") == 3 and "3 processed: 3 delivered" in done.stderr
    assert not list((tmp_path / "spool" / "failed").glob("*.json"))
    assert len(list((tmp_path / "spool" / "maildir" / "incoming_email" / "new").iterdir())) == 3


async def test_replay_after_gitlab_lost_its_jobs(tmp_path: Path, redis: Any) -> None:
    sections = {"incoming_email": {"delivery_method": "sidekiq"}, "redis": {"url": redis.url}}
    config = config_file(tmp_path, **sections)
    entries = await seed(tmp_path / "spool", State.DELIVERED, 4)
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 3600))
    done = cli("replay", "--config", config, "--since", since, "--mailbox", "incoming_email")
    assert done.returncode == 0, done.stderr
    jobs = [json.loads(job) for job in redis.command("LRANGE", "queue:default", "0", "-1")]
    assert sorted(job["jid"] for job in jobs) == sorted(e.id for e in entries)
    selected = cli("replay", "--config", config, "--id", entries[0].id)
    assert selected.returncode == 0 and selected.stdout.startswith(entries[0].id)
    assert redis.command("LLEN", "queue:default") == 5  # replaying a delivered entry pushes again, on purpose


def test_replay_eml_files_through_the_rules(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    good, auto = tmp_path / "good.eml", tmp_path / "auto.eml"
    good.write_bytes(numbered_message(9, rcpt="someone@example.org"))
    auto.write_bytes(b"Auto-Submitted: auto-replied\n\nout of office\n")
    dry = cli("replay", "--config", config, "--rcpt", REPLY_RCPT, "--dry-run", str(good), str(auto))
    assert "would deliver" in dry.stdout and "would drop" in dry.stdout
    done = cli("replay", "--config", config, "--rcpt", REPLY_RCPT, str(good), str(auto))
    assert done.returncode == 0, done.stderr
    assert f"{good}  delivered" in done.stdout and f"{auto}  dropped" in done.stdout
    (copy,) = (tmp_path / "spool" / "maildir" / "incoming_email" / "new").iterdir()
    assert copy.read_bytes().startswith(f"Delivered-To: {REPLY_RCPT}\r\n".encode())
    again = cli("replay", "--config", config, "--rcpt", REPLY_RCPT, str(good))
    assert "duplicate" in again.stdout
    unknown = cli("replay", "--config", config, str(good))
    assert "rejected" in unknown.stdout and "couldn't figure out" in unknown.stdout


def test_replay_needs_a_selection(tmp_path: Path) -> None:
    done = cli("replay", "--config", config_file(tmp_path))
    assert done.returncode == 2 and "select entries" in done.stderr
    bad_time = cli("replay", "--config", config_file(tmp_path), "--since", "yesterday-ish")
    assert bad_time.returncode == 2 and "neither an ISO time" in bad_time.stderr


async def test_spool_list_show_stats(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    failed = await seed(tmp_path / "spool", State.FAILED, 2)
    await seed(tmp_path / "spool", State.PENDING, 1)
    listing = cli("spool", "list", "--config", config, "--state", "failed")
    assert listing.returncode == 0 and len(listing.stdout.splitlines()) == 3  # a header row, two entries
    assert listing.stdout.startswith("ID ")
    assert "GitLab said no" in listing.stdout
    shown = cli("spool", "show", "--config", config, "--message", failed[0].id)
    assert re.search(rf"^id: +{failed[0].id}$", shown.stdout, re.MULTILINE) and "Subject: message 0" in shown.stdout
    received = re.search(r"^received_at: +(\S+)$", shown.stdout, re.MULTILINE)
    assert received and datetime.fromisoformat(received[1]).timestamp() == pytest.approx(failed[0].received_at)
    raw = json.loads(cli("spool", "show", "--config", config, "--json", failed[0].id).stdout)
    assert (raw["id"], raw["received_at"]) == (failed[0].id, failed[0].received_at)
    stats = json.loads(cli("spool", "stats", "--config", config, "--json").stdout)
    assert (stats["failed"], stats["pending"], stats["delivered"]) == (2, 1, 0)
    assert stats["oldest_pending_seconds"] >= 60
    missing = cli("spool", "show", "--config", config, "nope")
    assert missing.returncode == 1 and "no entry" in missing.stderr


async def test_spool_and_replay_take_another_journal_with_spool(tmp_path: Path) -> None:
    """The collector keeps its own journal (its systemd unit: /var/lib/lmtp-gateway-collect); an admin looks
    into it and replays from it with --spool, whatever spool.path the configuration names."""
    config = config_file(tmp_path)
    other = tmp_path / "collect-journal"
    (entry,) = await seed(other, State.FAILED, 1)
    stats = json.loads(cli("spool", "stats", "--config", config, "--spool", str(other), "--json").stdout)
    assert (stats["journal"], stats["failed"]) == (str(other), 1)
    listing = cli("spool", "list", "--config", config, "--spool", str(other))
    assert listing.stdout.splitlines()[1].startswith(entry.id)
    shown = cli("spool", "show", "--config", config, "--spool", str(other), entry.id)
    assert shown.returncode == 0 and re.search(rf"^message: +{other / 'failed'}/", shown.stdout, re.MULTILINE)
    done = cli("replay", "--config", config, "--spool", str(other), "--state", "failed")
    assert done.returncode == 0, done.stderr
    assert (other / "delivered" / f"{entry.id}.json").exists()
    assert not (tmp_path / "spool" / "delivered").exists() or not any((tmp_path / "spool" / "delivered").iterdir())


def rescans_of(journal: Journal, monkeypatch: pytest.MonkeyPatch) -> list[State]:
    """Each listing of pending/ by the running gateway's rescan, recorded as it happens."""
    listings: list[State] = []
    iter_ids = journal.iter_ids
    monkeypatch.setattr(journal, "iter_ids", lambda state: listings.append(state) or iter_ids(state))
    return listings


async def test_serve_takes_over_what_another_process_left_pending(
    start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay that could not deliver leaves its entries pending; the running gateway finds them by listing
    pending/ and reads each once. When its attempt fails (Redis is down here), the entry waits in deferred/ until
    its retry is due, out of memory, and later rescans of pending/ do not read it again."""
    monkeypatch.setattr(dispatch, "RESCAN_SECONDS", 0.05)
    dead_redis = {
        "incoming_email": {"delivery_method": "sidekiq"},
        "redis": {"url": f"redis://127.0.0.1:{free_port()}"},
    }
    running = await start_gateway(make_config(tmp_path / "spool", **dead_redis), backoff_base=3600)
    journal = running.gateway.journal
    listings = rescans_of(journal, monkeypatch)
    read: list[str] = []
    load_all = journal.load_all
    monkeypatch.setattr(journal, "load_all", lambda state, ids: read.extend(ids) or load_all(state, ids))
    other = Journal(tmp_path / "spool")  # as replay opens it: not the owner
    entry = Entry(
        id="f" * 24, fingerprint="f" * 64, state=State.PENDING, received_at=time.time(), ingress="replay",
        mail_from="a@b", rcpt=REPLY_RCPT, mailbox="incoming_email", key="k", handler="create_note",
        source="envelope", reason="", size=10,
    )  # fmt: skip
    await other.commit([draft(entry, b"", numbered_message(1))])
    other.close()
    dispatcher = running.gateway.dispatcher
    await eventually(lambda: dispatcher.stats.transient >= 1, what="a first attempt (Redis is down)")
    rescans = len(listings)
    await eventually(lambda: len(listings) >= rescans + 3, what="three more rescans")
    assert read == [entry.id]
    deferred = journal.find(entry.id)
    assert deferred is not None and deferred.state is State.DEFERRED and deferred.attempts == 1
    assert not dispatcher.knows(entry.id)  # out of memory until its retry is due
    assert deferred.next_attempt_at is not None and deferred.next_attempt_at > time.time() + 60


async def test_a_commit_under_way_is_not_delivered_before_its_250(
    start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rescan lists pending/ while a commit's files are there but not yet flushed (a slow disk here): it must
    leave them to the commit, or GitLab would get a message the gateway has not acknowledged and may yet lose."""
    monkeypatch.setattr(dispatch, "RESCAN_SECONDS", 0.02)
    running = await start_gateway()
    flush = os.fdatasync
    flushing, disk_done = threading.Event(), threading.Event()

    def slow_disk(descriptor: int) -> None:  # runs in the journal's flush threads
        flushing.set()
        disk_done.wait(60)
        flush(descriptor)

    monkeypatch.setattr(os, "fdatasync", slow_disk)
    listings = rescans_of(running.gateway.journal, monkeypatch)
    delivered = tmp_path / "spool" / "maildir" / "incoming_email" / "new"
    client = await running.client()
    sending = asyncio.ensure_future(client.send("a@example.org", [REPLY_RCPT], numbered_message(1)))
    try:
        assert await asyncio.to_thread(flushing.wait, 60), "the commit never reached its flush"
        rescans = len(listings)
        await eventually(lambda: len(listings) >= rescans + 3, what="three rescans while the commit is flushed")
        assert not sending.done()
        assert not list(delivered.glob("*"))
    finally:
        disk_done.set()
    assert (await sending).results[0].startswith("250 2.0.0")
    await eventually(lambda: list(delivered.glob("*")), what="delivery after the 250")
    await client.quit()


async def test_a_damaged_entry_is_never_shipped_and_shows_everywhere(tmp_path: Path) -> None:
    """An acknowledged entry whose message file was cut short: replay refuses to deliver it and sets it aside;
    spool stats and spool list show it; once repaired, replay --quarantined delivers it."""
    config = config_file(tmp_path)
    spool = tmp_path / "spool"
    (entry,) = await seed(spool, State.PENDING, 1)
    eml = spool / "pending" / f"{entry.id}.eml"
    whole = eml.read_bytes()
    eml.write_bytes(whole[: len(whole) // 2])  # the file system lost the second half
    (spool / "pending" / f"{'f' * 24}.json").write_text('{"id": "ff')  # and another entry's metadata is torn
    counted = json.loads(cli("spool", "stats", "--config", config, "--json").stdout)
    assert counted["pending"] == 2  # every name counts, readable or not

    # No process owns this journal: replay gives it the start-up repair `serve` would, and says what it set aside.
    done = cli("replay", "--config", config, "--id", entry.id)
    assert done.returncode == 1
    said = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert set(said) == {entry.id, "f" * 24}
    assert "damaged" in said[entry.id] and "were committed" in said[entry.id] and "set aside" in said[entry.id]
    assert "damaged" in said["f" * 24] and "metadata unreadable" in said["f" * 24]
    assert not (spool / "maildir" / "incoming_email" / "new").exists() or not any(
        (spool / "maildir" / "incoming_email" / "new").iterdir()
    )
    assert (spool / "quarantine" / f"{entry.id}.eml").exists()
    assert json.loads(cli("spool", "stats", "--config", config, "--json").stdout)["quarantined"] == 2
    listed = {
        line.split()[0]: line for line in cli("spool", "list", "--config", config, "--quarantined").stdout.splitlines()
    }
    assert "bytes" in listed[entry.id] and "were committed" in listed[entry.id]
    still = cli("replay", "--config", config, "--quarantined", "--id", entry.id)
    assert still.returncode == 1 and "damaged" in still.stdout

    (spool / "quarantine" / f"{entry.id}.eml").write_bytes(whole)  # the admin restores the file from a backup
    assert "whole again" in cli("spool", "list", "--config", config, "--quarantined").stdout
    back = cli("replay", "--config", config, "--quarantined", "--id", entry.id)
    assert back.returncode == 0, back.stdout + back.stderr
    assert f"{entry.id}  delivered" in back.stdout
    (copy,) = (spool / "maildir" / "incoming_email" / "new").iterdir()
    assert copy.read_bytes() == whole
    assert json.loads(cli("spool", "stats", "--config", config, "--json").stdout)["quarantined"] == 1  # the torn one


def test_replay_with_nothing_selected_says_so(tmp_path: Path) -> None:
    done = cli("replay", "--config", config_file(tmp_path), "--state", "failed")
    assert done.returncode == 0 and "nothing selected" in done.stderr


async def test_replay_leaves_a_journal_its_owner_holds_as_it_is(tmp_path: Path) -> None:
    """While `serve` owns the journal, a pending .json being written is a commit under way, not damage: replay
    repairs nothing there and touches only what it was asked to deliver."""
    config = config_file(tmp_path)
    spool = tmp_path / "spool"
    (entry,) = await seed(spool, State.FAILED, 1)
    owner = Journal(spool)
    owner.open()
    (spool / "pending" / f"{'e' * 24}.json").write_bytes(b"")  # as a commit looks before its metadata is written
    try:
        done = cli("replay", "--config", config, "--state", "failed")
    finally:
        owner.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.split()[:2] for line in done.stdout.splitlines()] == [[entry.id, "delivered"]]
    assert (spool / "pending" / f"{'e' * 24}.json").exists() and not (spool / "quarantine").exists()
