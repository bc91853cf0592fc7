"""What an admin asks of a journal: which entries, how many in each state, and what was set aside.

Used by ``lmtp-gateway spool`` and ``replay``, by ``check`` and by the metrics: every place an admin looks sees
the same counts, damaged entries included.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lmtp_gateway.journal import Entry, Journal, State


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


def select(journal: Journal, selection: Selection) -> list[Entry]:
    """The entries `selection` names, oldest first."""
    found = [entry for entry in journal.entries(*selection.states) if selection.matches(entry)]
    return sorted(found, key=lambda entry: entry.received_at)


@dataclass(frozen=True)
class SetAside:
    """An entry in quarantine/: its metadata if readable, and what is still wrong (None: repaired, whole)."""

    id: str
    entry: Entry | None
    problem: str | None


def set_aside(journal: Journal, ids: tuple[str, ...] = ()) -> list[SetAside]:
    """The entries in quarantine/ (those whose id starts with one of `ids`, if given), each looked at afresh."""
    chosen = [i for i in journal.quarantined() if not ids or any(i.startswith(prefix) for prefix in ids)]
    return [SetAside(entry_id, *journal.diagnose(entry_id)) for entry_id in chosen]


@dataclass
class Stats:
    journal: Path
    counts: dict[str, int] = field(default_factory=dict)  # per state, from the directory listings
    quarantined: int = 0
    oldest_pending_seconds: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "journal": str(self.journal),
            **self.counts,
            "quarantined": self.quarantined,
            "oldest_pending_seconds": self.oldest_pending_seconds,
        }


def stats(journal: Journal, now: float | None = None) -> Stats:
    """Entries per state (every name counts, whether its metadata reads or not), entries set aside, and the age
    of the oldest pending one."""
    found = Stats(journal.root, {state.value: len(journal.ids(state)) for state in State})
    found.quarantined = len(journal.quarantined())
    pending = [entry.received_at for entry in journal.entries(State.PENDING)]
    if pending:
        found.oldest_pending_seconds = round((now if now is not None else time.time()) - min(pending), 1)
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
