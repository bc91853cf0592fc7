"""What an admin asks of a spool: which entries, how many in each state, and what was set aside.

A spool is the journals under one ``spool.path``: one per worker (``journal.shards``), read together. Used by
``lmtp-gateway spool`` and ``replay``, by ``check`` and by the metrics: every place an admin looks sees the same
counts, in every shard, damaged entries included.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lmtp_gateway.journal import WAITING, Entry, Journal, State
from lmtp_gateway.journal.shards import shard_roots


class Spool:
    """Every journal under `root`, worker 0's first."""

    def __init__(self, root: Path, *, sync: str = "fsync") -> None:
        self.root = root
        self.journals = [Journal(path, sync=sync) for path in shard_roots(root)]

    def entries(self, *states: State) -> Iterator[Entry]:
        for journal in self.journals:
            yield from journal.entries(*states)

    def journal_of(self, entry: Entry) -> Journal:
        """The shard that holds `entry` (worker 0's when it is gone meanwhile)."""
        return next((journal for journal in self.journals if journal.exists(entry)), self.journals[0])

    def close(self) -> None:
        for journal in self.journals:
            journal.close()


@dataclass(frozen=True)
class Selection:
    ids: tuple[str, ...] = ()
    states: tuple[State, ...] = ()
    mailbox: str | None = None
    since: float | None = None
    until: float | None = None

    @property
    def empty(self) -> bool:
        return not (self.ids or self.states or self.mailbox or self.since is not None or self.until is not None)

    def matches(self, entry: Entry) -> bool:
        return (
            (not self.ids or any(entry.id.startswith(prefix) for prefix in self.ids))
            and (not self.states or entry.state in self.states)
            and (self.mailbox is None or entry.mailbox == self.mailbox)
            and (self.since is None or entry.received_at >= self.since)
            and (self.until is None or entry.received_at <= self.until)
        )


def select(spool: Spool, selection: Selection) -> list[Entry]:
    """The entries `selection` names, in every shard, oldest first."""
    found = [entry for entry in spool.entries(*selection.states) if selection.matches(entry)]
    return sorted(found, key=lambda entry: entry.received_at)


@dataclass(frozen=True)
class SetAside:
    """An entry in quarantine/: its metadata if readable, and what is still wrong (None: repaired, whole)."""

    id: str
    entry: Entry | None
    problem: str | None
    journal: Journal

    @property
    def where(self) -> Path:
        """The entry's files, without their .json / .eml."""
        return self.journal.quarantine / self.id


def set_aside(spool: Spool, ids: tuple[str, ...] = ()) -> list[SetAside]:
    """The entries in every quarantine/ (those whose id starts with one of `ids`, if given), each looked at
    afresh."""
    return [
        SetAside(entry_id, *journal.diagnose(entry_id), journal)
        for journal in spool.journals
        for entry_id in journal.quarantined()
        if not ids or any(entry_id.startswith(prefix) for prefix in ids)
    ]


@dataclass
class Stats:
    spool: Path
    shards: int = 1
    counts: dict[str, int] = field(default_factory=dict)  # per state, from the directory listings
    quarantined: int = 0
    oldest_pending_seconds: float | None = None  # of the entries waiting for delivery (pending or deferred)

    def as_dict(self) -> dict[str, object]:
        return {
            "journal": str(self.spool),
            "shards": self.shards,
            **self.counts,
            "quarantined": self.quarantined,
            "oldest_pending_seconds": self.oldest_pending_seconds,
        }


def stats(spool: Spool, now: float | None = None) -> Stats:
    """Entries per state in all shards (every name counts, whether its metadata reads or not), entries set
    aside, and the age of the oldest entry waiting for delivery."""
    found = Stats(spool.root, len(spool.journals), {state.value: 0 for state in State})
    for journal in spool.journals:
        for state in State:
            found.counts[state.value] += journal.count(state)
        found.quarantined += len(journal.quarantined())
    oldest = min((entry.received_at for entry in spool.entries(*WAITING)), default=None)
    if oldest is not None:
        found.oldest_pending_seconds = round((now if now is not None else time.time()) - oldest, 1)
    return found


TIMES = ("received_at", "next_attempt_at", "finished_at")  # seconds since the epoch in the metadata


def moment(seconds: float) -> str:
    """A journal time as an admin reads it: ISO 8601 in local time, with its offset."""
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="milliseconds")


def fields(entry: Entry) -> list[tuple[str, str]]:
    """An entry's metadata as (name, text) for a person: times in ISO 8601, empty fields left out."""
    shown: list[tuple[str, str]] = []
    for name, value in json.loads(entry.to_json()).items():
        if value in (None, "", {}, []):
            continue
        if name in TIMES:
            value = moment(value)
        shown.append((name, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)))
    return shown
