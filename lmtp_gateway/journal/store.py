"""The journal's directories and what is done to entries in them: commit, state changes, reading, retention."""

from __future__ import annotations

import collections
import contextlib
import fcntl
import heapq
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from lmtp_gateway.errors import JournalError, storage_error_text
from lmtp_gateway.journal import recovery
from lmtp_gateway.journal.entry import FINISHED, FORMAT, WAITING, Draft, Entry, State
from lmtp_gateway.journal.writer import Flushable, IOThread, start_writeback, write_all

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"
# Where the dedupe look-up searches: an entry on its way or delivered. A copy dropped or failed answers a retry
# the same way, but only a message received twice with no answer in between (Postfix saw none) is looked for
# there, and a second dropped or dead entry of it delivers nothing twice. Each directory searched costs a look-up
# that waits for the journal's writes to that directory.
DEDUPE_STATES = (State.PENDING, State.DEFERRED, State.DELIVERED)
# Since when every entry this journal delivers is named by its GitLab target (a copy GitLab would route elsewhere
# is dropped, and only dropped copies are named by the copy). Entries of earlier versions were named by the copy,
# and a retry of one must still find it: the look-up by the copy's name is needed for entries from before then.
TARGET_NAMED = "target-named-since"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


class DamagedEntry(JournalError):
    """An entry's files are not what was committed (cut short, changed, or its metadata unreadable)."""


def _create(path: Path) -> int:
    """A new file under `path`, replacing whatever had the name (a copy of the same entry committed by a session
    that raced this one): never written into in place, since its inode may be another entry's body as well."""
    try:
        return os.open(path, _CREATE, 0o640)
    except FileExistsError:
        path.unlink()
        return os.open(path, _CREATE, 0o640)


def _link(source: Path, name: Path) -> None:
    try:
        os.link(source, name)
    except FileExistsError:
        name.unlink()
        os.link(source, name)


class Journal:
    def __init__(self, root: Path, *, sync: str = "fsync") -> None:
        self.root = root
        self.sync = sync
        self.tmp = root / "tmp"
        self.quarantine = root / QUARANTINE
        self._state_dirs = {state: root / state.value for state in State}  # asked for several times per message
        self._state_names = {state: str(path) for state, path in self._state_dirs.items()}
        self._io = IOThread(root, sync)
        # ids whose commit is under way: their files exist under final names before they are durable
        self._committing: collections.Counter[str] = collections.Counter()
        self._owner_lock: int | None = None
        self.target_named_since = self._read_target_named_since()
        self._target_named_read_at = time.monotonic()

    # --- layout ---

    def state_dir(self, state: State) -> Path:
        return self._state_dirs[state]

    def eml_path(self, entry: Entry) -> Path:
        return self.state_dir(entry.state) / f"{entry.id}.eml"

    def _json_path(self, entry: Entry) -> Path:
        return self.state_dir(entry.state) / f"{entry.id}.json"

    def ensure_layout(self) -> None:
        """Create the directories; safe while a daemon uses the journal (unlike `open`)."""
        for directory in (self.tmp, *(self.state_dir(s) for s in State)):
            directory.mkdir(parents=True, exist_ok=True, mode=0o750)

    def open(self) -> int:
        """For the journal's owner at start-up: create the layout, clear uncommitted files, repair interrupted
        state changes, set aside what is damaged. Returns how many entries wait for delivery (none is read:
        after a long outage they may be hundreds of thousands, and the dispatcher reads them a window at a time)."""
        self.ensure_layout()
        self._take_ownership()
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        recovery.repair(self)
        self._record_target_named_since()
        return self.count(*WAITING)

    def _read_target_named_since(self) -> float:
        """When this journal began naming deliveries by target; never, as far as anyone can tell, without the file
        (a journal of an earlier version, or one whose owner has not opened it yet)."""
        try:
            return float((self.root / TARGET_NAMED).read_text())
        except (OSError, ValueError):
            return float("inf")

    def _record_target_named_since(self) -> None:
        if self.target_named_since != float("inf"):
            return
        # A journal with nothing a retry could find was never written by an earlier version (or is past caring).
        since = time.time() if any(next(self.iter_ids(state), None) for state in DEDUPE_STATES) else 0.0
        partial = self.tmp / TARGET_NAMED
        try:
            partial.write_text(f"{since}\n")
            os.replace(partial, self.root / TARGET_NAMED)  # a torn file reads as "never": more look-ups, not fewer
        except OSError as error:  # a full disk must not keep the gateway from starting: ask again next start
            log.warning("journal %s: cannot record %s: %s", self.root, TARGET_NAMED, storage_error_text(error))
            with contextlib.suppress(OSError):
                partial.unlink()
            return
        self.target_named_since = since

    def copy_named(self, since: float) -> bool:
        """Whether entries named by the copy (an earlier version's deliveries) may still be here and be retried:
        received before this journal named them by target, and not longer ago than `since`."""
        now = time.monotonic()
        if self.target_named_since == float("inf") and now - self._target_named_read_at > 5:
            self._target_named_read_at = now  # another worker's shard, which its owner may have opened since
            self.target_named_since = self._read_target_named_since()
        return self.target_named_since > since

    def _take_ownership(self) -> None:
        """One owner per journal: a second `serve` or `collect` on the same spool would clear the first one's
        files in tmp/ and race its repairs."""
        # read-only: a file open for writing would keep the file system from being remounted read-only
        lock = os.open(self.root / "owner.lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise JournalError(
                f"{self.root} is in use by another lmtp-gateway process (serve or collect); "
                "give each process its own spool.path"
            ) from None
        self._owner_lock = lock

    @property
    def owned(self) -> bool:
        return self._owner_lock is not None

    # --- writing ---

    def new_tmp(self) -> tuple[Path, BinaryIO]:
        """A fresh file in tmp/ for a message too large to keep in memory while it arrives."""
        path = self.tmp / f"{uuid.uuid4().hex}.data"
        try:
            return path, open(path, "xb")
        except OSError as error:
            raise JournalError(storage_error_text(error)) from error

    def find(self, entry_id: str, states: tuple[State, ...] = tuple(State)) -> Entry | None:
        """The entry with this id in one of `states`: a name look-up per state directory, so its cost does not
        grow with the entries kept. The dedupe look-up is done twice for every copy received, and nearly always
        a miss: an access(2) per directory, no exception, no path objects."""
        name = f"/{entry_id}.json"
        for state in states:
            path = self._state_names[state] + name
            if os.access(path, os.F_OK):
                with contextlib.suppress(FileNotFoundError, ValueError, TypeError, OSError):
                    entry = Entry.from_json(Path(path).read_bytes())
                    entry.state = state
                    return entry
        return None

    async def commit(self, drafts: list[Draft]) -> None:
        """Make every draft visible in its state directory and durable, or raise JournalError.

        The message is stored once for all the drafts that share it: written (or, when it arrived into tmp/, linked)
        under the first draft's name, and hard-linked under the others'. Then each draft's metadata. Everything is
        flushed with the rest of the I/O thread's round; no temporary names, because creating a file is the
        costliest step there is. A crash before the flush can leave an entry cut short; it was never acknowledged,
        and recovery sets it aside (torn metadata, or a size that does not match).
        """
        if not drafts:
            return
        shared: dict[int, list[Draft]] = {}
        for draft in drafts:
            shared.setdefault(id(draft.body), []).append(draft)
        try:
            for group in shared.values():
                body = group[0].body
                size = len(body) if isinstance(body, bytes) else body.stat().st_size
                for draft in group:
                    entry = draft.entry
                    entry.format, entry.stored_size, entry.sha256 = FORMAT, size, draft.digest.hex()
                    entry.prepend = draft.prefix.decode()
        except OSError as error:  # the spilled body of a large message is gone
            raise JournalError(storage_error_text(error)) from error
        bodies = [(group[0].body, [self.eml_path(d.entry) for d in group]) for group in shared.values()]
        metadata = [(self._json_path(d.entry), d.entry.to_json()) for d in drafts]
        directories = {self.state_dir(d.entry.state) for d in drafts}
        writeback = start_writeback if self.sync == "fsync" else None
        # The owner's own readers skip what it is committing (`committing`); another process's cannot know.
        owned = self.owned

        def work() -> Flushable:
            flushable = Flushable(directories=directories | ({self.tmp} if not owned else set()))

            def opened(descriptor: int) -> int:
                flushable.files.append(descriptor)
                return descriptor

            try:
                for body, (first, *others) in bodies:
                    if isinstance(body, Path):
                        _link(body, first)
                        descriptor = opened(os.open(first, os.O_RDONLY | os.O_CLOEXEC))
                    else:
                        write_all(descriptor := opened(_create(first)), body)
                    if writeback is not None:
                        writeback(descriptor)
                    for name in others:
                        _link(first, name)
                for path, data in metadata:
                    if owned:
                        write_all(descriptor := opened(_create(path)), data)
                    else:  # the owner's dispatcher may list pending/ now: it must never read half a .json
                        descriptor = opened(self._write_atomically(path, data))
                    if writeback is not None:
                        writeback(descriptor)
            except BaseException:
                for descriptor in flushable.files:
                    os.close(descriptor)
                raise
            return flushable

        def undo() -> None:
            for path in [p for _, names in bodies for p in names] + [p for p, _ in metadata]:
                with contextlib.suppress(OSError):
                    path.unlink()

        ids = [draft.entry.id for draft in drafts]
        self._committing.update(ids)
        try:
            await self._io.run(work, durable=True, undo=undo)
        except OSError as error:
            raise JournalError(storage_error_text(error)) from error
        finally:
            for entry_id in ids:
                self._committing[entry_id] -= 1
                if not self._committing[entry_id]:
                    del self._committing[entry_id]

    def committing(self, entry_id: str) -> bool:
        """Is a commit of this entry under way (its files there, not yet durable: nobody may deliver it yet)?"""
        return self._committing[entry_id] > 0

    def _replace_metadata(self, entry: Entry, data: bytes) -> int:
        """Atomically (tmp + rename), so readers never see half a .json; returns the open new file. A deferred
        entry keeps its retry time (the file's modification time)."""
        descriptor = self._write_atomically(self._json_path(entry), data)
        if entry.state is State.DEFERRED and entry.next_attempt_at is not None:
            os.utime(descriptor, (entry.next_attempt_at, entry.next_attempt_at))
        return descriptor

    def _write_atomically(self, path: Path, data: bytes) -> int:
        tmp = self.tmp / f"{path.stem}.{uuid.uuid4().hex[:8]}.json"
        descriptor = os.open(tmp, _CREATE, 0o640)
        try:
            write_all(descriptor, data)
            os.replace(tmp, path)
        except BaseException:
            os.close(descriptor)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return descriptor

    def discard(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    async def update(self, entry: Entry) -> None:
        """Rewrite an entry's metadata (attempts, last error); not flushed: losing it loses no mail."""
        data = entry.to_json()
        await self._io.run(lambda: Flushable([self._replace_metadata(entry, data)]), durable=False)

    async def move(self, entry: Entry, state: State, *, durable: bool = False) -> None:
        """Change an entry's state: the .json is renamed first (it is the truth), the .eml follows, then the
        metadata is brought up to date in place (finished entries' metadata is informational: no new file).
        A dead letter's metadata must survive anything: it is replaced atomically and flushed. Into deferred/,
        the .json's modification time becomes ``entry.next_attempt_at``: the deferred scan reads only that."""
        rename = self._state_change(entry, state)
        entry.finished_at = time.time() if state in FINISHED else None
        new_json = self._json_path(entry)
        data = entry.to_json()
        due = entry.next_attempt_at if state is State.DEFERRED else None

        def work() -> Flushable:
            rename()
            if durable:
                return Flushable([self._replace_metadata(entry, data)], {new_json.parent})
            descriptor = os.open(new_json, os.O_WRONLY | os.O_CLOEXEC)
            try:
                write_all(descriptor, data)
                os.ftruncate(descriptor, len(data))
                if due is not None:
                    os.utime(descriptor, (due, due))
            finally:
                os.close(descriptor)
            return Flushable()

        await self._io.run(work, durable=durable)

    async def defer(self, entry: Entry, due: float, *, tried: bool = True) -> None:
        """Park an entry in deferred/ until `due` (not flushed: after a crash it is retried early or late, never
        lost). An entry deferred untried (its mailbox is failing) keeps its metadata as it is: two renames and
        the file's time, for each of the hundred thousand entries an outage may defer."""
        entry.next_attempt_at = due
        if tried:
            await self.move(entry, State.DEFERRED)
            return
        rename = self._state_change(entry, State.DEFERRED)
        new_json = self._json_path(entry)

        def work() -> Flushable:
            rename()
            os.utime(new_json, (due, due))
            return Flushable()

        await self._io.run(work, durable=False)

    def _state_change(self, entry: Entry, state: State) -> Callable[[], None]:
        """Set `entry`'s state; returns the renames that carry its files there, for the I/O thread: the .json first
        (it is the truth), then the .eml (recovery moves one a crash left behind to its .json)."""
        old_json, old_eml = self._json_path(entry), self.eml_path(entry)
        entry.state = state
        new_json, new_eml = self._json_path(entry), self.eml_path(entry)

        def rename() -> None:
            if old_json != new_json:
                os.replace(old_json, new_json)
                os.replace(old_eml, new_eml)

        return rename

    # --- reading ---

    def entries(self, *states: State) -> Iterator[Entry]:
        for state in states or tuple(State):
            yield from self.load_all(state, self.ids(state))

    def ids(self, state: State) -> list[str]:
        """The ids of the entries in `state`, from the directory listing alone."""
        return list(self.iter_ids(state))

    def iter_ids(self, state: State) -> Iterator[str]:
        """The ids in `state` one at a time: a long pending/ is never held as a list."""
        for name in _scan(self.state_dir(state)):
            if name.endswith(".json"):
                yield name[: -len(".json")]

    def count(self, *states: State) -> int:
        return sum(1 for state in states for _ in self.iter_ids(state))

    def load_all(self, state: State, entry_ids: list[str]) -> list[Entry]:
        """Those of `entry_ids` still in `state` (any may have moved on meanwhile). The journal's owner sets aside
        a pending entry whose metadata it cannot read (damaged since it was committed), so that it is shown as
        such rather than skipped in silence at every look."""
        found = []
        for entry_id in entry_ids:
            path = self.state_dir(state) / f"{entry_id}.json"
            try:
                found.append(self._load(path, state))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, TypeError) as error:
                if self.owned and state is State.PENDING and not self.committing(entry_id):
                    self.set_aside(entry_id, state, f"metadata unreadable ({error})")
                else:
                    log.error("journal: unreadable metadata %s: %s", path, error)
        return found

    @staticmethod
    def _load(path: Path, state: State) -> Entry:
        entry = Entry.from_json(path.read_bytes())
        entry.state = state  # where the file is decides, should a crash have left older content behind
        if state is State.DEFERRED:  # and the file's time says when it is retried
            with contextlib.suppress(OSError):
                entry.next_attempt_at = path.stat().st_mtime
        return entry

    def due(self, now: float, limit: int) -> tuple[list[str], float | None]:
        """The deferred entries whose retry is due, earliest first, at most `limit`; and when the next one falls
        due (`now` when more are due than were returned, None when nothing else waits). Reads the directory and
        each file's time, never the metadata: a scan of a deferred queue of 200 000 entries takes a fraction of
        a second, in the caller's thread."""
        ready: list[tuple[float, str]] = []
        later: float | None = None
        try:
            for entry_id, when in _timed(self.state_dir(State.DEFERRED), ".json"):
                if when <= now:
                    ready.append((when, entry_id))
                elif later is None or when < later:
                    later = when
        except OSError as error:
            log.error("journal: cannot list %s: %s", self.state_dir(State.DEFERRED), storage_error_text(error))
            return [], now
        if len(ready) > limit:
            return [entry_id for _, entry_id in heapq.nsmallest(limit, ready)], now
        return [entry_id for _, entry_id in sorted(ready)], later

    def waiting(self) -> tuple[int, float | None]:
        """How many entries wait for delivery (pending and deferred), and when the oldest of them arrived (its
        message file's time: written once, when the message came in)."""
        count, oldest = 0, None
        for state in WAITING:
            for _, written in _timed(self.state_dir(state), ".eml"):
                count += 1
                oldest = written if oldest is None else min(oldest, written)
        return count, oldest

    def exists(self, entry: Entry) -> bool:
        """Is `entry` still where its state says (not finished meanwhile by another worker or process)?"""
        return self._json_path(entry).exists()

    def read_message(self, entry: Entry) -> bytes:
        """The message as GitLab gets it, checked against what was committed; DamagedEntry if it is not whole."""
        stored = self.eml_path(entry).read_bytes()
        problem = entry.damage(stored)
        if problem is not None:
            raise DamagedEntry(problem)
        return entry.message(stored)

    # --- entries set aside ---

    def set_aside(self, entry_id: str, state: State, problem: str) -> None:
        """Move a damaged entry out of the way into quarantine/, where `spool`, the metrics, /readyz and `check`
        show it, and `replay --quarantined` brings it back once repaired."""
        recovery.set_aside(self, entry_id, state, problem)

    def quarantined(self) -> list[str]:
        """The ids of the entries set aside."""
        return sorted({name.rpartition(".")[0] for name in _scan(self.quarantine) if name.endswith((".json", ".eml"))})

    def diagnose(self, entry_id: str) -> tuple[Entry | None, str | None]:
        """A set-aside entry's metadata (None if unreadable) and what is still wrong with it (None: it is whole)."""
        return recovery.diagnose(self, entry_id)

    async def restore(self, entry_id: str) -> Entry:
        """Bring a repaired entry back from quarantine/ as pending; DamagedEntry if it is still not whole."""
        entry, problem = self.diagnose(entry_id)
        if entry is None or problem is not None:
            raise DamagedEntry(problem or "metadata unreadable")
        source = (self.quarantine / f"{entry_id}.json", self.quarantine / f"{entry_id}.eml")
        entry.state = State.PENDING
        entry.extra["restored_at"] = time.time()
        data = entry.to_json()

        def work() -> Flushable:
            os.replace(source[1], self.eml_path(entry))
            os.replace(source[0], self._json_path(entry))
            return Flushable([self._replace_metadata(entry, data)], {self.state_dir(State.PENDING), self.quarantine})

        await self._io.run(work, durable=True)
        return entry

    # --- retention ---

    def expire(self, retention: float, now: float | None = None) -> int:
        """Remove finished entries older than `retention` seconds; pending entries are never removed."""
        cutoff = (now if now is not None else time.time()) - retention
        removed = 0
        for entry in self.entries(*FINISHED):
            if (entry.finished_at or entry.received_at) < cutoff:
                for path in (self._json_path(entry), self.eml_path(entry)):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                removed += 1
        return removed

    # --- health ---

    def free_bytes(self) -> int:
        """Space left for the journal (what an unprivileged process may use)."""
        info = os.statvfs(self.root)
        return info.f_bavail * info.f_frsize

    def probe(self, min_free: int = 0) -> str | None:
        """Can a message be committed now? Creates, fsyncs and removes a small file in tmp/ (so a read-only or
        full file system shows even for root) and wants `min_free` bytes left. None if so, else the reason."""
        path = (self.tmp if self.tmp.is_dir() else self.root) / f"probe-{uuid.uuid4().hex}"
        try:
            with open(path, "xb") as handle:
                handle.write(b"probe\n")
                handle.flush()
                os.fsync(handle.fileno())
            path.unlink()
            free = self.free_bytes()
        except OSError as error:
            with contextlib.suppress(OSError):
                path.unlink()
            return f"{storage_error_text(error)}: {self.root}"
        if free < min_free:
            return f"journal disk nearly full: {free // 2**20} MiB free in {self.root}, under {min_free // 2**20} MiB"
        return None

    def close(self) -> None:
        self._io.close()
        if self._owner_lock is not None:
            os.close(self._owner_lock)
            self._owner_lock = None


def _timed(directory: Path, suffix: str) -> Iterator[tuple[str, float]]:
    """The entries of `directory` by their files with `suffix`: each id and its file's modification time, from
    the listing and a stat, never the contents. A directory missing has none, a file gone meanwhile (delivered,
    moved) is left out; any other error is the caller's."""
    try:
        with os.scandir(directory) as listing:
            for item in listing:
                if not item.name.endswith(suffix):
                    continue
                try:
                    when = item.stat().st_mtime
                except FileNotFoundError:
                    continue
                yield item.name[: -len(suffix)], when
    except FileNotFoundError:
        return


def _scan(directory: Path) -> Iterator[str]:
    """The names in `directory`, read as the listing goes (os.scandir). A directory missing has none; one that
    cannot be read is logged and has none: a rescan or a retention sweep must not end the daemon over this."""
    try:
        with os.scandir(directory) as listing:
            for item in listing:
                yield item.name
    except FileNotFoundError:
        return
    except OSError as error:
        log.error("journal: cannot list %s: %s", directory, storage_error_text(error))
