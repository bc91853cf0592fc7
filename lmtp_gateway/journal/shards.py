"""One journal per worker process, all under ``spool.path``: every journal keeps a single writer.

Worker 0's shard is ``spool.path`` itself, the layout a single process has always used, so a journal written
by one process is read as it is when more workers start; worker *k* (k ≥ 1) writes ``spool.path/shard-k``::

    /var/lib/lmtp-gateway/          shard 0: tmp/ pending/ deferred/ delivered/ … as ever
    /var/lib/lmtp-gateway/shard-1/  shard 1: the same layout

With fewer workers than shards (``lmtp.workers`` lowered), the shards nobody owns any more are *merged* into
the ones that remain before the workers start: each entry is committed again in shard ``k mod workers`` (the
commit is flushed), and only then removed where it was. A crash in between leaves the entry in both; the next
merge keeps the copy already in the target. Nothing is lost and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

from lmtp_gateway.journal.entry import Draft, State
from lmtp_gateway.journal.store import TARGET_NAMED, Journal

log = logging.getLogger(__name__)

SHARD_NAME = re.compile(r"shard-([1-9][0-9]*)")
MERGE_BATCH = 500  # entries per flushed commit while merging


def shard_root(spool: Path, index: int) -> Path:
    """The journal of worker `index`."""
    return spool if index == 0 else spool / f"shard-{index}"


def shard_roots(spool: Path) -> list[Path]:
    """Every shard that exists under `spool`, worker 0's first: what the admin commands, the metrics and the
    cross-shard look-ups read."""
    found = [spool]
    with contextlib.suppress(FileNotFoundError):
        numbered = [(int(m[1]), p) for p in spool.iterdir() if (m := SHARD_NAME.fullmatch(p.name)) and p.is_dir()]
        found += [path for _, path in sorted(numbered)]
    return found


def shard_index(spool: Path, root: Path) -> int:
    found = SHARD_NAME.fullmatch(root.name)
    return int(found[1]) if found and root.parent == spool else 0


async def merge_orphans(spool: Path, workers: int, *, sync: str = "fsync") -> int:
    """Merge every shard at index ≥ `workers` into the shard that takes over its index; returns the entries
    moved. Takes each journal's owner lock: it runs before the workers start, and refuses (JournalError) while
    another process still owns one."""
    moved = 0
    for root in shard_roots(spool):
        index = shard_index(spool, root)
        if index < workers:
            continue
        moved += await _merge(root, shard_root(spool, index % workers), sync)
    return moved


async def _merge(source_root: Path, target_root: Path, sync: str) -> int:
    source, target = Journal(source_root, sync=sync), Journal(target_root, sync=sync)
    source.open()  # recovery first: what a crash left there is put right before anything moves
    target.open()
    moved = 0
    try:
        for state in State:
            batch: list[Draft] = []
            for entry_id in source.iter_ids(state):
                draft = _draft(source, target, state, entry_id)
                if draft is not None:
                    batch.append(draft)
                if len(batch) >= MERGE_BATCH:
                    moved += await _move(source, target, batch)
                    batch = []
            moved += await _move(source, target, batch)
        _move_quarantine(source, target)
    finally:
        source.close()
        target.close()
    _remove_if_empty(source_root)
    log.info("journal %s merged into %s: %d entries", source_root, target_root, moved, extra={"event": "shard_merged"})
    return moved


def _draft(source: Journal, target: Journal, state: State, entry_id: str) -> Draft | None:
    """The entry as a draft for the target; None when the target holds it already (the source's copy goes)."""
    found = source.load_all(state, [entry_id])
    if not found:
        if (source.state_dir(state) / f"{entry_id}.json").exists():  # unreadable: set aside, not left behind
            source.set_aside(entry_id, state, "metadata unreadable while merging shards")
        return None
    entry = found[0]
    try:
        stored = source.eml_path(entry).read_bytes()
    except OSError as error:
        source.set_aside(entry_id, state, f"message file unreadable while merging shards ({error.strerror})")
        return None
    problem = entry.damage(stored)
    if problem is not None:
        source.set_aside(entry_id, state, problem)
        return None
    if target.find(entry_id) is not None:
        for suffix in (".json", ".eml"):
            with contextlib.suppress(FileNotFoundError):
                (source.state_dir(state) / f"{entry_id}{suffix}").unlink()
        return None
    prefix = entry.prepend.encode() if entry.format >= 2 else b""
    return Draft(entry, prefix, stored, hashlib.sha256(stored).digest())


async def _move(source: Journal, target: Journal, batch: list[Draft]) -> int:
    if not batch:
        return 0
    states = [draft.entry.state for draft in batch]
    await target.commit(batch)  # flushed: only now may the source's files go
    for draft, state in zip(batch, states, strict=True):
        if state is State.DEFERRED and draft.entry.next_attempt_at is not None:
            with contextlib.suppress(OSError):
                due = draft.entry.next_attempt_at
                os.utime(target.state_dir(state) / f"{draft.entry.id}.json", (due, due))
        for suffix in (".json", ".eml"):
            with contextlib.suppress(FileNotFoundError):
                (source.state_dir(state) / f"{draft.entry.id}{suffix}").unlink()
    return len(batch)


def _move_quarantine(source: Journal, target: Journal) -> None:
    """Entries set aside stay set aside, in the target's quarantine/ (a name taken there keeps both)."""
    if not source.quarantine.is_dir():
        return
    target.quarantine.mkdir(exist_ok=True, mode=0o750)
    for path in source.quarantine.iterdir():
        destination = target.quarantine / path.name
        if destination.exists():
            destination = target.quarantine / f"{path.stem}.from-{source.root.name}{path.suffix}"
        os.replace(path, destination)


def _remove_if_empty(root: Path) -> None:
    """The merged shard's directories, once nothing but empty directories, its lock and its marker are left."""
    leftovers = [p for p in root.rglob("*") if p.is_file() and p.name not in ("owner.lock", TARGET_NAMED)]
    if leftovers:
        log.error("journal %s: %d files left after merging; not removed", root, len(leftovers))
        return
    shutil.rmtree(root, ignore_errors=True)
