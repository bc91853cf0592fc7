"""The journal: the one place durability lives.

A directory an admin can read with ordinary tools::

    spool/
      tmp/                 being written; emptied at start-up (nothing there was ever acknowledged)
      pending/ID.eml       the message as GitLab will get it (Return-Path and Delivered-To prepended)
      pending/ID.json      its metadata: envelope, verdict, attempts, last error
      delivered/  dropped/  failed/

An entry is committed when its ``.eml`` and ``.json`` are written in a state directory and both files and the
directory are flushed to disk; only then may anyone answer ``250``. All of that happens in one I/O thread, so
the event loop never waits for the file system.

The ``.json`` is the truth about an entry's state: a state change renames the ``.json`` first and the ``.eml``
follows, and recovery moves any ``.eml`` left behind to its ``.json``.

The entry id is the first 24 hex digits of the fingerprint sha256(raw message, mailbox, recipient), so the
same message for the same recipient always has the same id (and Sidekiq ``jid``): a Postfix retry of a
message already committed finds its entry instead of making a second one.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _syncfs(descriptor: int) -> None:
    """syncfs reports the write errors of its file system since `descriptor` was opened (and each only once per
    descriptor): a round opens its own before it writes anything, so no error in its data can pass unseen."""
    if _LIBC.syncfs(descriptor) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2
try:
    _LIBC.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
except AttributeError:  # not Linux: fdatasync alone does the whole job, one file after the other
    _start_writeback = None
else:

    def _start_writeback(fd: int) -> None:
        """Queue the file's pages for writing now, without waiting: the fdatasyncs that follow then find the
        data written and the block allocations of every file of the round in one file-system commit, instead of
        forcing one commit (and one disk flush) each."""
        _LIBC.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _write_all(descriptor: int, *parts: bytes | Path) -> None:
    """Write every part (bytes, or the content of a file) at the descriptor's position."""
    for part in parts:
        if isinstance(part, Path):
            with open(part, "rb") as source:
                while chunk := source.read(1 << 20):
                    _write_all(descriptor, chunk)
            continue
        view = memoryview(part)
        while view:
            view = view[os.write(descriptor, view) :]


@dataclass
class _Job:
    """One request to the I/O thread. `work` does the file-system calls and names what must reach the disk
    (open descriptors to fdatasync, directories to fsync); `undo` removes what it made should that fail."""

    work: Callable[[], _Flushable]
    durable: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    undo: Callable[[], None] | None = None


@dataclass
class _Flushable:
    files: list[int] = field(default_factory=list)  # descriptors, closed by the I/O thread once flushed
    directories: set[Path] = field(default_factory=set)


class _IOThread:
    """All of the journal's file-system work, in one thread beside the event loop.

    Creating, renaming and flushing files are system calls that can take most of a millisecond each on a busy
    file system, and the event loop must not wait for any of them: while one of them runs, every session
    waits. Here they run in rounds: every job queued since the last round does its work, then one flush makes
    the round durable as a whole (under load a round covers many sessions, so the disk sees one commit per
    round, not several per message), and its callers are woken when that flush returns. The flush runs in a
    pool of threads while this one goes on with the next round. Every thread releases the interpreter lock for
    the length of each call.

    ``fsync`` flushes exactly the files and directories of the round; ``syncfs`` the journal's whole file
    system in one call (it also waits for whatever else is dirty there); ``off`` nothing.
    """

    def __init__(self, root: Path, method: str) -> None:
        self.root = root
        self.method = method
        self._lock = threading.Condition()
        self._queue: list[_Job] = []
        self._flushers = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="journal-flush")
        self._thread: threading.Thread | None = None
        self._closed = False

    async def run(
        self, work: Callable[[], _Flushable], *, durable: bool, undo: Callable[[], None] | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        job = _Job(work, durable, loop, loop.create_future(), undo)
        with self._lock:
            if self._closed:
                raise JournalError("the journal is closed")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="journal-io", daemon=True)
                self._thread.start()
            self._queue.append(job)
            self._lock.notify()
        await job.future

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed and not self._queue:
                    return
                batch, self._queue = self._queue, []
            self._round(batch)

    def _round(self, batch: list[_Job]) -> None:
        """The durable jobs' work, then their flush in the background while this thread goes on with the rest
        of the round (state changes) and the next round: flushes of consecutive rounds overlap."""
        flushed = self.method != "off"
        durable = [job for job in batch if job.durable and flushed]
        watch: int | None = None  # syncfs: the descriptor that will see this round's write errors
        written: list[tuple[_Job, _Flushable]] = []
        for job in durable:
            try:
                if watch is None and self.method == "syncfs":
                    watch = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                written.append((job, job.work()))
            except Exception as error:  # handed to the waiting caller, never lost
                _finish(job, None, error)
        if written:
            try:
                self._flush(written, watch)
                watch = None  # closed by the round's flush when it is over
            except Exception as error:  # the pool is gone (closed) or cannot start a thread: fail, never hang
                for job, flushable in written:
                    _finish(job, flushable, error)
        if watch is not None:
            os.close(watch)
        for job in (job for job in batch if not (job.durable and flushed)):
            try:
                _finish(job, job.work(), None)
            except Exception as error:
                _finish(job, None, error)

    def _flush(self, written: list[tuple[_Job, _Flushable]], watch: int | None) -> None:
        """Every file and directory of the round at once (the block layer merges the disk flushes of calls that
        overlap; one after the other, each file would cost a flush of its own), or one syncfs on `watch`; the
        jobs are finished when the last call returns."""
        if watch is not None:
            calls = [functools.partial(_syncfs, watch)]
        else:
            calls = [functools.partial(os.fdatasync, fd) for _, flushable in written for fd in flushable.files]
            calls += [functools.partial(_fsync_dir, d) for d in {d for _, f in written for d in f.directories}]
        outcome = _RoundFlush(written, len(calls), watch)
        for call in calls:
            self._flushers.submit(call).add_done_callback(outcome.one_done)
        if not calls:
            outcome.finish()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(10)
        self._flushers.shutdown(wait=True)  # the last rounds' flushes: their callers are waiting for them


class _RoundFlush:
    """Counts down the flush calls of one round; the last to return finishes the round's jobs (with the first
    error, if any: a round is durable as a whole or not at all)."""

    def __init__(self, written: list[tuple[_Job, _Flushable]], calls: int, watch: int | None = None) -> None:
        self.written = written
        self.remaining = calls
        self.watch = watch
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def one_done(self, call: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self.remaining -= 1
            if self.error is None:
                self.error = call.exception()
            if self.remaining:
                return
        self.finish()

    def finish(self) -> None:
        if self.watch is not None:
            with contextlib.suppress(OSError):
                os.close(self.watch)
        for job, flushable in self.written:
            _finish(job, flushable, self.error)


def _finish(job: _Job, flushable: _Flushable | None, error: BaseException | None) -> None:
    """Close the job's files, undo its work if it failed, and wake its caller."""
    for descriptor in flushable.files if flushable is not None else ():
        with contextlib.suppress(OSError):
            os.close(descriptor)
    if error is not None and job.undo is not None:
        with contextlib.suppress(OSError):
            job.undo()
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        job.loop.call_soon_threadsafe(_settle, job.future, error)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the caller gave up waiting (cancelled)
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class Journal:
    def __init__(self, root: Path, *, sync: str = "fsync") -> None:
        self.root = root
        self.sync = sync
        self.tmp = root / "tmp"
        self.quarantine = root / "quarantine"
        self._state_dirs = {state: root / state.value for state in State}  # asked for several times per message
        self._io = _IOThread(root, sync)
        # id -> state of every entry, kept by the journal's owner (serve) from open() on: dedupe look-ups then
        # cost no system call. Other processes (replay, spool) go to the files.
        self._index: dict[str, State] | None = None
        # ids whose commit is under way: their files exist under final names before they are durable
        self._committing: collections.Counter[str] = collections.Counter()
        self._owner_lock: int | None = None

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
            for entry in self.load_all(state, [entry_id]):
                return entry
        return None

    async def commit(self, drafts: list[Draft]) -> None:
        """Make every draft visible in its state directory and durable, or raise JournalError.

        Both files are written under their final names, the .eml first (without metadata it does not exist for
        anyone, and recovery removes it), then flushed with the rest of the I/O thread's round; no temporary
        names, because creating a file is the costliest step there is. A crash before the flush can leave an
        entry cut short; it was never acknowledged, and recovery sets it aside (torn metadata, or a
        ``stored_size`` that does not match).
        """
        if not drafts:
            return
        files: list[tuple[Path, bytes, bytes | Path]] = []
        try:
            for draft in drafts:
                body_size = len(draft.body) if isinstance(draft.body, bytes) else draft.body.stat().st_size
                draft.entry.stored_size = len(draft.prefix) + body_size
                files.append((self.eml_path(draft.entry), draft.prefix, draft.body))
                files.append((self._json_path(draft.entry), draft.entry.to_json(), b""))
        except OSError as error:  # the spilled body of a large message is gone
            raise JournalError(describe_os_error(error)) from error
        directories = {self.state_dir(d.entry.state) for d in drafts}
        start_writeback = _start_writeback if self.sync == "fsync" else None

        def work() -> _Flushable:
            flushable = _Flushable(directories=directories)
            try:
                for path, head, rest in files:
                    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
                    flushable.files.append(descriptor)
                    _write_all(descriptor, head, rest)
                    if start_writeback is not None:
                        start_writeback(descriptor)
            except BaseException:
                for descriptor in flushable.files:
                    os.close(descriptor)
                raise
            return flushable

        def undo() -> None:
            for path, _, _ in files:
                with contextlib.suppress(OSError):
                    path.unlink()

        ids = [draft.entry.id for draft in drafts]
        self._committing.update(ids)
        try:
            await self._io.run(work, durable=True, undo=undo)
        except OSError as error:
            raise JournalError(describe_os_error(error)) from error
        finally:
            for entry_id in ids:
                self._committing[entry_id] -= 1
                if not self._committing[entry_id]:
                    del self._committing[entry_id]
        if self._index is not None:
            self._index.update((d.entry.id, d.entry.state) for d in drafts)

    def committing(self, entry_id: str) -> bool:
        """Is a commit of this entry under way (its files there, not yet durable: nobody may deliver it yet)?"""
        return self._committing[entry_id] > 0

    def _replace_metadata(self, entry: Entry, data: bytes) -> int:
        """Atomically (tmp + rename), so readers never see half a .json; returns the open new file."""
        tmp = self.tmp / f"{entry.id}.{uuid.uuid4().hex[:8]}.json"
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            _write_all(descriptor, data)
            os.replace(tmp, self._json_path(entry))
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
        await self._io.run(lambda: _Flushable([self._replace_metadata(entry, data)]), durable=False)

    async def move(self, entry: Entry, state: State, *, durable: bool = False) -> None:
        """Change an entry's state: the .json is renamed first (it is the truth), the .eml follows, then the
        metadata is brought up to date in place (finished entries' metadata is informational: no new file).
        A dead letter's metadata must survive anything: it is replaced atomically and flushed."""
        old_json, old_eml = self._json_path(entry), self.eml_path(entry)
        entry.state = state
        entry.finished_at = time.time() if state in FINISHED else None
        new_json, new_eml = self._json_path(entry), self.eml_path(entry)
        data = entry.to_json()

        def work() -> _Flushable:
            if old_json != new_json:
                os.replace(old_json, new_json)
                os.replace(old_eml, new_eml)
            if durable:
                return _Flushable([self._replace_metadata(entry, data)], {new_json.parent})
            descriptor = os.open(new_json, os.O_WRONLY | os.O_CLOEXEC)
            try:
                _write_all(descriptor, data)
                os.ftruncate(descriptor, len(data))
            finally:
                os.close(descriptor)
            return _Flushable()

        await self._io.run(work, durable=durable)
        if self._index is not None:
            self._index[entry.id] = state

    # --- reading ---

    def entries(self, *states: State) -> Iterator[Entry]:
        for state in states or tuple(State):
            yield from self.load_all(state, self.ids(state))

    def ids(self, state: State) -> list[str]:
        """The ids of the entries in `state`, from the directory listing alone."""
        try:
            names = os.listdir(self.state_dir(state))
        except FileNotFoundError:
            return []
        except OSError as error:  # a rescan or a retention sweep must not end the daemon over this
            log.error("journal: cannot list %s: %s", self.state_dir(state), describe_os_error(error))
            return []
        return [name[: -len(".json")] for name in names if name.endswith(".json")]

    def load_all(self, state: State, entry_ids: list[str]) -> list[Entry]:
        """Those of `entry_ids` still in `state` (any may have moved on meanwhile). The owner's index learns
        those another process (replay) made."""
        found = []
        for entry_id in entry_ids:
            path = self.state_dir(state) / f"{entry_id}.json"
            try:
                found.append(self._load(path, state))
                if self._index is not None:
                    self._index.setdefault(entry_id, state)  # never over what the event loop set meanwhile
            except FileNotFoundError:
                continue
            except (OSError, ValueError, TypeError) as error:
                log.error("journal: unreadable metadata %s: %s", path, error)
        return found

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
        self._io.close()
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
