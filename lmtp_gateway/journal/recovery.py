"""What a crash can leave in the journal, put right at start-up; and damaged entries, set aside in quarantine/.

A crash can interrupt three things, and each leaves a mark recovery knows:

* a commit before its flush: files under final names that were never acknowledged: an ``.eml`` without
  metadata (removed), or a pending entry whose metadata is torn or whose ``.eml`` is shorter than recorded (set
  aside: it was never acknowledged, but nothing that might be mail is ever deleted);
* a state change between its two renames: the ``.json`` already in the new state's directory, the ``.eml``
  still in the old one (moved to its ``.json``: the ``.json`` is the truth);
* anything in tmp/ (removed by the caller: nothing there was ever acknowledged).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lmtp_gateway.journal.entry import Entry, State

if TYPE_CHECKING:
    from lmtp_gateway.journal.store import Journal

log = logging.getLogger(__name__)


def repair(journal: Journal) -> None:
    """One pass per state directory, reading names as the listing goes: after a long outage pending/ may hold
    hundreds of thousands of entries, and nothing here keeps a list of them."""
    for state in State:
        directory = journal.state_dir(state)
        for eml in [p for p in _emls(directory) if not (directory / f"{p.stem}.json").exists()]:
            owner = next((s for s in State if (journal.state_dir(s) / f"{eml.stem}.json").exists()), None)
            if owner is None:
                log.warning("journal: removing %s: never committed (no metadata)", eml)
                eml.unlink()
            else:
                rejoin(journal, eml, owner)
    # Only a commit cut short by a crash can be incomplete, and it is pending.
    damaged = [(i, p) for i in journal.iter_ids(State.PENDING) if (p := _check_size(journal, i, State.PENDING))]
    for entry_id, problem in damaged:
        set_aside(journal, entry_id, State.PENDING, problem)


def rejoin(journal: Journal, eml: Path, state: State) -> None:
    """Put a message file back with its metadata, in `state`'s directory: a state change renames the .json first,
    and a crash between the two renames leaves the .eml behind (the .json is the truth)."""
    os.replace(eml, journal.state_dir(state) / eml.name)
    log.warning(
        "journal: %s: message file found in %s/, where an interrupted state change left it; moved to %s/",
        eml.stem, eml.parent.name, state,
        extra={"event": "repaired", "journal_id": eml.stem},
    )  # fmt: skip


def _emls(directory: Path) -> Iterator[Path]:
    try:
        with os.scandir(directory) as listing:
            for item in listing:
                if item.name.endswith(".eml"):
                    yield Path(item.path)
    except FileNotFoundError:
        return


def _check_size(journal: Journal, entry_id: str, state: State) -> str | None:
    """A cheap look at an entry (its size, not its checksum, which whoever reads the message checks)."""
    directory = journal.state_dir(state)
    try:
        entry = Entry.from_json((directory / f"{entry_id}.json").read_bytes())
        size = (directory / f"{entry_id}.eml").stat().st_size
    except FileNotFoundError:
        return "message file missing"
    except (OSError, ValueError, TypeError):
        return "metadata unreadable"
    if size != entry.stored_size:
        return f"message file has {size} bytes, {entry.stored_size} were committed"
    return None


def set_aside(journal: Journal, entry_id: str, state: State, problem: str) -> None:
    journal.quarantine.mkdir(exist_ok=True, mode=0o750)
    for suffix in (".json", ".eml"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(journal.state_dir(state) / f"{entry_id}{suffix}", journal.quarantine / f"{entry_id}{suffix}")
    log.error(
        "journal: entry %s (%s) set aside in %s: %s",
        entry_id,
        state,
        journal.quarantine,
        problem,
        extra={"event": "quarantined", "journal_id": entry_id, "reason": problem},
    )


def diagnose(journal: Journal, entry_id: str) -> tuple[Entry | None, str | None]:
    try:
        entry = Entry.from_json((journal.quarantine / f"{entry_id}.json").read_bytes())
    except FileNotFoundError:
        return None, "metadata file missing"
    except (OSError, ValueError, TypeError) as error:
        return None, f"metadata unreadable ({error})"
    try:
        stored = (journal.quarantine / f"{entry_id}.eml").read_bytes()
    except FileNotFoundError:
        return entry, "message file missing"
    except OSError as error:
        return entry, f"message file unreadable ({error.strerror})"
    return entry, entry.damage(stored)
