"""The journal: the one place durability lives.

A directory an admin can read with ordinary tools::

    spool/
      tmp/                 being written; emptied at start-up (nothing there was ever acknowledged)
      pending/ID.eml       the message as GitLab will get it (Return-Path and Delivered-To prepended)
      pending/ID.json      its metadata: envelope, verdict, attempts, last error
      delivered/  dropped/  failed/

An entry is committed when its ``.json`` is renamed into a state directory and that directory is fsynced;
only then may anyone answer ``250``. The ``.json`` is the truth about an entry's state: a state change renames
the ``.json`` first and the ``.eml`` follows, and recovery moves any ``.eml`` left behind to its ``.json``.

The entry id is the first 24 hex digits of the fingerprint sha256(raw message, mailbox, recipient), so the
same message for the same recipient always has the same id (and Sidekiq ``jid``): a Postfix retry of a
message already committed finds its entry instead of making a second one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

ID_LENGTH = 24


class State(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DROPPED = "dropped"
    FAILED = "failed"


FINISHED = (State.DELIVERED, State.DROPPED, State.FAILED)


class JournalError(Exception):
    """The journal cannot take the message now (disk full, I/O error): a temporary failure."""


def fingerprint(raw_digest: bytes, mailbox: str, rcpt: str) -> str:
    """Stable identity of one delivery: the raw bytes (as a digest), the mailbox and the recipient."""
    return hashlib.sha256(raw_digest + b"\0" + mailbox.encode() + b"\0" + rcpt.encode("utf-8", "replace")).hexdigest()


def envelope_headers(mail_from: str | None, rcpt: str | None) -> bytes:
    """What the gateway prepends: GitLab routes on headers only, so the envelope must become headers."""
    lines = []
    if mail_from is not None:
        lines.append(f"Return-Path: <{mail_from}>\r\n")
    if rcpt is not None:
        lines.append(f"Delivered-To: {rcpt}\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


@dataclass
class Entry:
    """The metadata kept beside each ``.eml``."""

    id: str
    fingerprint: str
    state: State
    received_at: float
    ingress: str  # lmtp, replay, imap:<mailbox>, graph:<mailbox>
    mail_from: str | None
    rcpt: str | None
    mailbox: str | None
    key: str | None
    handler: str | None
    source: str | None
    reason: str
    size: int  # of the message as received
    stored_size: int = 0  # of the .eml (with the envelope headers): recovery checks the file is whole
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: float | None = None
    finished_at: float | None = None
    sink: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        data = {name: getattr(self, name) for name in _ENTRY_FIELDS}  # shallow: asdict's deep copy costs
        # One line: json's C encoder only runs without indent (the indenting one is pure Python and cost a
        # quarter of a millisecond per message). `lmtp-gateway spool show` and jq print it readably.
        return json.dumps(data, ensure_ascii=False).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Entry:
        raw = json.loads(data)
        known = {f.name for f in fields(cls)}
        entry = cls(**{k: v for k, v in raw.items() if k in known})
        entry.state = State(entry.state)
        return entry


_ENTRY_FIELDS = tuple(f.name for f in fields(Entry))


@dataclass
class Draft:
    """One copy of an incoming message about to be committed: our envelope headers, then the message, which is
    in memory or (when large) in a file under tmp/ that several drafts of one transaction share."""

    entry: Entry
    prefix: bytes
    body: bytes | Path


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        if directory:
            os.fsync(fd)
        else:
            os.fdatasync(fd)  # enough for a new file: its size is part of what fdatasync writes
    finally:
        os.close(fd)


def _syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC.syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
    finally:
        os.close(fd)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _GroupFlush:
    """Durability for many sessions at once: one thread makes everything asked for since its last round reach
    the disk, then wakes every caller of that round. Under load a round covers many sessions, so the disk sees
    one flush per round instead of three per message.

    Only the flush runs in the thread: it is the one slow call, and it releases the GIL for its whole length.
    (File creation and renames stay in the event loop: done from a thread, each of those short calls would wait
    for the GIL behind a busy event loop, up to the 5 ms switch interval each.)

    ``fsync`` flushes exactly the files and directories given; ``syncfs`` flushes the journal's whole file system
    in one call (fewer calls, but it also waits for whatever else is dirty on that file system).
    """

    def __init__(self, root: Path, method: str) -> None:
        self.root = root
        self.method = method
        self._lock = threading.Condition()
        self._queue: list[tuple[list[Path], list[Path], asyncio.Future[None], asyncio.AbstractEventLoop]] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    async def flush(self, files: list[Path], directories: list[Path]) -> None:
        if self.method == "off":
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="journal-flush", daemon=True)
                self._thread.start()
            self._queue.append((files, directories, future, loop))
            self._lock.notify()
        await future

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed and not self._queue:
                    return
                batch, self._queue = self._queue, []
            error: BaseException | None = None
            try:
                if self.method == "syncfs":
                    _syncfs(self.root)
                else:
                    for path in {p for files, _, _, _ in batch for p in files}:
                        _fsync_path(path)
                    for path in {p for _, dirs, _, _ in batch for p in dirs}:
                        _fsync_path(path, directory=True)
            except OSError as caught:
                error = caught
            for _, _, future, loop in batch:
                loop.call_soon_threadsafe(_settle, future, error)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class _FilePool:
    """Empty files made ahead of time in tmp/ by a background thread.

    Creating a file is the costliest thing the journal does per message (on some file systems most of a
    millisecond of kernel time); renaming one costs a few microseconds. So a thread keeps a few dozen empty files
    ready, and the event loop fills one and renames it to its final name. The thread spends its time in the
    kernel with the GIL released, on the other core. Leftovers are removed with the rest of tmp/ at start-up.
    """

    def __init__(self, directory: Path, size: int = 64) -> None:
        self.directory = directory
        self.size = size
        self._ready: collections.deque[Path] = collections.deque()
        self._wanted = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def take(self) -> Path | None:
        """A fresh empty file, or None when none is ready (the caller then creates one itself)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._fill, name="journal-files", daemon=True)
            self._thread.start()
        try:
            path = self._ready.popleft()
        except IndexError:
            path = None
        if len(self._ready) < self.size // 2:
            self._wanted.set()
        return path

    def _fill(self) -> None:
        while not self._closed:
            self._wanted.wait()
            self._wanted.clear()
            while len(self._ready) < self.size and not self._closed:
                path = self.directory / f"{uuid.uuid4().hex}.new"
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
                except OSError:
                    break  # a full disk: the event loop will meet the error itself and answer 452
                self._ready.append(path)

    def close(self) -> None:
        self._closed = True
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(5)
        while self._ready:
            with contextlib.suppress(OSError):
                self._ready.popleft().unlink()


class Journal:
    def __init__(self, root: Path, *, sync: str = "fsync") -> None:
        self.root = root
        self.sync = sync
        self.tmp = root / "tmp"
        self.quarantine = root / "quarantine"
        self._flush = _GroupFlush(root, sync)
        self._files = _FilePool(self.tmp)
        # id -> state of every entry, kept by the journal's owner (serve) from open() on: dedupe look-ups then
        # cost no system call. Other processes (replay, spool) go to the files.
        self._index: dict[str, State] | None = None
        self._owner_lock: int | None = None

    # --- layout ---

    def state_dir(self, state: State) -> Path:
        return self.root / state.value

    def eml_path(self, entry: Entry) -> Path:
        return self.state_dir(entry.state) / f"{entry.id}.eml"

    def _json_path(self, entry: Entry) -> Path:
        return self.state_dir(entry.state) / f"{entry.id}.json"

    def ensure_layout(self) -> None:
        """Create the directories; safe while a daemon uses the journal (unlike `open`)."""
        for directory in (self.tmp, *(self.state_dir(s) for s in State)):
            directory.mkdir(parents=True, exist_ok=True, mode=0o750)

    def open(self) -> list[Entry]:
        """For the journal's owner at start-up: create the layout, clear uncommitted files, repair interrupted
        state changes, index every entry; return the pending entries."""
        self.ensure_layout()
        self._take_ownership()
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        self._repair()
        self._index = {path.stem: state for state in State for path in self.state_dir(state).glob("*.json")}
        return sorted(self.entries(State.PENDING), key=lambda e: e.received_at)

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

    def _repair(self) -> None:
        where: dict[str, State] = {}
        for state in State:
            for path in self.state_dir(state).glob("*.json"):
                where[path.stem] = state
        for state in State:
            for eml in self.state_dir(state).glob("*.eml"):
                owner = where.get(eml.stem)
                if owner is None:
                    log.warning("journal: removing %s: never committed (no metadata)", eml)
                    eml.unlink()
                elif owner is not state:
                    os.replace(eml, self.state_dir(owner) / eml.name)
        for entry_id, state in where.items():
            if state is State.PENDING:  # only a commit cut short by a crash can be incomplete, and it is pending
                self._check_whole(entry_id, state)

    def _check_whole(self, entry_id: str, state: State) -> None:
        """Set aside an entry cut short by a crash before its sync (never acknowledged) or damaged since."""
        json_path, eml = self.state_dir(state) / f"{entry_id}.json", self.state_dir(state) / f"{entry_id}.eml"
        try:
            entry = Entry.from_json(json_path.read_bytes())
            problem = None if eml.stat().st_size == entry.stored_size else "message file has the wrong size"
        except FileNotFoundError:
            problem = "message file missing"
        except (OSError, ValueError, TypeError):
            problem = "metadata unreadable"
        if problem is None:
            return
        self.quarantine.mkdir(exist_ok=True, mode=0o750)
        for path in (json_path, eml):
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, self.quarantine / path.name)
        log.error("journal: entry %s (%s) set aside in %s: %s", entry_id, state, self.quarantine, problem)

    # --- writing ---

    def new_tmp(self) -> tuple[Path, BinaryIO]:
        """A fresh file in tmp/ for a message too large to keep in memory while it arrives."""
        path = self.tmp / f"{uuid.uuid4().hex}.data"
        try:
            return path, open(path, "xb")
        except OSError as error:
            raise JournalError(describe_os_error(error)) from error

    def find(self, entry_id: str) -> Entry | None:
        """The entry with this id in any state (the dedupe look-up)."""
        if self._index is not None:
            state = self._index.get(entry_id)
            states: tuple[State, ...] = () if state is None else (state,)
        else:
            states = tuple(State)
        for state in states:
            path = self.state_dir(state) / f"{entry_id}.json"
            try:
                return self._load(path, state)
            except FileNotFoundError:
                continue
            except (OSError, ValueError, TypeError) as error:
                log.error("journal: unreadable metadata %s: %s", path, error)
                continue
        return None

    async def commit(self, drafts: list[Draft]) -> None:
        """Make every draft visible in its state directory and durable, or raise JournalError.

        Both files are written under their final names, the .eml first (without metadata it does not exist for
        anyone, and recovery removes it), then one group flush; no temporary names, because creating a file is
        the costliest step there is. A crash before the flush can leave an entry cut short; it was never
        acknowledged, and recovery sets it aside (torn metadata, or a ``stored_size`` that does not match).
        """
        if not drafts:
            return
        placed: list[Path] = []
        try:
            for draft in drafts:
                eml = self.eml_path(draft.entry)
                placed.append(eml)
                with self._new_file(eml) as handle:
                    handle.write(draft.prefix)
                    if isinstance(draft.body, bytes):
                        handle.write(draft.body)
                    else:
                        with open(draft.body, "rb") as source:
                            shutil.copyfileobj(source, handle, 1 << 20)
                    draft.entry.stored_size = handle.tell()
                metadata = self._json_path(draft.entry)
                placed.append(metadata)
                with self._new_file(metadata) as handle:
                    handle.write(draft.entry.to_json())
            await self._flush.flush(placed, sorted({self.state_dir(d.entry.state) for d in drafts}))
            if self._index is not None:
                self._index.update((d.entry.id, d.entry.state) for d in drafts)
        except OSError as error:
            for path in placed:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise JournalError(describe_os_error(error)) from error

    def _new_file(self, final: Path) -> BinaryIO:
        """Open a new file under its final name: a ready-made one renamed into place when there is one."""
        ready = self._files.take()
        if ready is None:
            return open(final, "wb")
        os.replace(ready, final)
        return open(final, "r+b")

    def _write_metadata(self, entry: Entry) -> Path:
        """Atomically (tmp + rename): readers never see half a .json."""
        tmp = self.tmp / f"{entry.id}.{uuid.uuid4().hex[:8]}.json"
        tmp.write_bytes(entry.to_json())
        final = self._json_path(entry)
        os.replace(tmp, final)
        return final

    def discard(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    def update(self, entry: Entry) -> None:
        """Rewrite an entry's metadata (attempts, last error); not flushed: losing it loses no mail."""
        self._write_metadata(entry)

    async def move(self, entry: Entry, state: State, *, durable: bool = False) -> None:
        """Change an entry's state: the .json is renamed first (it is the truth), the .eml follows, then the
        metadata is brought up to date in place (finished entries' metadata is informational: no new file)."""
        old_json, old_eml = self._json_path(entry), self.eml_path(entry)
        entry.state = state
        entry.finished_at = time.time() if state in FINISHED else None
        new_json = self._json_path(entry)
        if old_json != new_json:
            os.replace(old_json, new_json)
            os.replace(old_eml, self.eml_path(entry))
        if durable:  # a dead letter's metadata must survive anything: atomic replacement, flushed
            self._write_metadata(entry)
            await self._flush.flush([new_json], [self.state_dir(state)])
        else:
            with open(new_json, "r+b") as handle:
                data = entry.to_json()
                handle.write(data)
                handle.truncate(len(data))
        if self._index is not None:
            self._index[entry.id] = state

    # --- reading ---

    def entries(self, *states: State) -> Iterator[Entry]:
        for state in states or tuple(State):
            if not self.state_dir(state).is_dir():
                continue
            for path in self.state_dir(state).glob("*.json"):
                try:
                    yield self._load(path, state)
                except FileNotFoundError:
                    continue  # moved while we looked
                except (OSError, ValueError, TypeError) as error:
                    log.error("journal: unreadable metadata %s: %s", path, error)

    @staticmethod
    def _load(path: Path, state: State) -> Entry:
        entry = Entry.from_json(path.read_bytes())
        entry.state = state  # where the file is decides, should a crash have left older content behind
        return entry

    def exists(self, entry: Entry) -> bool:
        """Is `entry` still where its state says (not finished meanwhile by another worker or process)?"""
        return self._json_path(entry).exists()

    def read_message(self, entry: Entry) -> bytes:
        return self.eml_path(entry).read_bytes()

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
                if self._index is not None:
                    self._index.pop(entry.id, None)
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
            return f"{describe_os_error(error)}: {self.root}"
        if free < min_free:
            return f"journal disk nearly full: {free // 2**20} MiB free in {self.root}, under {min_free // 2**20} MiB"
        return None

    def close(self) -> None:
        self._flush.close()
        self._files.close()
        if self._owner_lock is not None:
            os.close(self._owner_lock)
            self._owner_lock = None


def describe_os_error(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "journal disk full"
    if error.errno == errno.EROFS:
        return "journal file system is read-only"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "journal directory not writable"
    return f"journal I/O error ({errno.errorcode.get(error.errno or 0, 'unknown')})"
