"""The journal's I/O thread: every file-system call of a commit or a state change, off the event loop, in rounds.

Creating, renaming and flushing files are system calls that can take most of a millisecond each on a busy file
system, and the event loop must not wait for any of them: while one of them runs, every session waits. Here
they run in rounds: every job queued since the last round does its work, then one flush makes the round durable
as a whole (under load a round covers many sessions, so the disk sees one commit per round, not several per
message), and its callers are woken when that flush returns. The flush runs in a pool of threads while this one
goes on with the next round. Every thread releases the interpreter lock for the length of each call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmtp_gateway.errors import JournalError


def fsync_dir(path: Path) -> None:
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
    start_writeback = None
else:

    def start_writeback(fd: int) -> None:
        """Queue the file's pages for writing now, without waiting: the fdatasyncs that follow then find the
        data written and the block allocations of every file of the round in one file-system commit, instead of
        forcing one commit (and one disk flush) each."""
        _LIBC.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def write_all(descriptor: int, *parts: bytes | Path) -> None:
    """Write every part (bytes, or the content of a file) at the descriptor's position."""
    for part in parts:
        if isinstance(part, Path):
            with open(part, "rb") as source:
                while chunk := source.read(1 << 20):
                    write_all(descriptor, chunk)
            continue
        view = memoryview(part)
        while view:
            view = view[os.write(descriptor, view) :]


@dataclass
class _Job:
    """One request to the I/O thread. `work` does the file-system calls and names what must reach the disk
    (open descriptors to fdatasync, directories to fsync); `undo` removes what it made should that fail."""

    work: Callable[[], Flushable]
    durable: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    undo: Callable[[], None] | None = None


@dataclass
class Flushable:
    files: list[int] = field(default_factory=list)  # descriptors, closed by the I/O thread once flushed
    directories: set[Path] = field(default_factory=set)


class IOThread:
    """The thread and its queue of jobs.

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
        self, work: Callable[[], Flushable], *, durable: bool, undo: Callable[[], None] | None = None
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
        written: list[tuple[_Job, Flushable]] = []
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
        done: list[tuple[_Job, BaseException | None]] = []
        for job in (job for job in batch if not (job.durable and flushed)):
            try:
                _close(job.work())
                done.append((job, None))
            except Exception as error:
                _undo(job, error)
                done.append((job, error))
        _wake(done)  # one wake-up of the event loop for the whole round, not one per state change

    def _flush(self, written: list[tuple[_Job, Flushable]], watch: int | None) -> None:
        """Every file and directory of the round at once (the block layer merges the disk flushes of calls that
        overlap; one after the other, each file would cost a flush of its own), or one syncfs on `watch`; the
        jobs are finished when the last call returns."""
        if watch is not None:
            calls = [functools.partial(_syncfs, watch)]
        else:
            calls = [functools.partial(os.fdatasync, fd) for _, flushable in written for fd in flushable.files]
            calls += [functools.partial(fsync_dir, d) for d in {d for _, f in written for d in f.directories}]
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

    def __init__(self, written: list[tuple[_Job, Flushable]], calls: int, watch: int | None = None) -> None:
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
            _close(flushable)
            _undo(job, self.error)
        _wake([(job, self.error) for job, _ in self.written])


def _finish(job: _Job, flushable: Flushable | None, error: BaseException | None) -> None:
    """Close the job's files, undo its work if it failed, and wake its caller."""
    _close(flushable)
    _undo(job, error)
    _wake([(job, error)])


def _close(flushable: Flushable | None) -> None:
    for descriptor in flushable.files if flushable is not None else ():
        with contextlib.suppress(OSError):
            os.close(descriptor)


def _undo(job: _Job, error: BaseException | None) -> None:
    if error is not None and job.undo is not None:
        with contextlib.suppress(OSError):
            job.undo()


def _wake(done: list[tuple[_Job, BaseException | None]]) -> None:
    """Settle the jobs' futures, one call into each event loop waiting for them."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], BaseException | None]]] = {}
    for job, error in done:
        by_loop.setdefault(job.loop, []).append((job.future, error))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    for future, error in settled:
        if future.done():  # the caller gave up waiting (cancelled)
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
