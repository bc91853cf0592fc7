"""Real, throw-away servers (Redis, Dovecot, Postfix) from Debian packages.

Used by the test-suite and by the benchmark scripts in ``contrib/``, so this
package depends on the standard library only; pytest is imported lazily and
only to turn a missing binary into a skip.

Every server binds 127.0.0.1 on a free port, keeps all of its state in a
private temporary directory, runs as a child process in its own session and
is stopped by ``stop()``, by the context manager, at interpreter exit and
(on Linux, when started from the main thread) when the parent process dies.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, Self

if TYPE_CHECKING:
    from .dovecot import DovecotServer
    from .postfix import PostfixServer
    from .redis import RedisServer

__all__ = [
    "ChildServer",
    "DovecotServer",
    "OnePort",
    "PostfixServer",
    "RedisServer",
    "free_port",
    "group_alive",
    "process_running",
    "require_binary",
    "start_process",
    "stop_process",
    "wait_until",
]

LOOPBACK = "127.0.0.1"

# Debian installs daemons in sbin, which is not on a normal user's PATH.
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks it (bind to port 0), so parallel test runs do not
    collide; the small race until the server binds it is handled by the
    servers retrying with a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_binary(name: str, package: str) -> str:
    """Return the absolute path of ``name`` or skip/fail with an install hint.

    Under CI (``CI=true``) a missing binary is an error, because silently
    skipping the integration tests there would hide a broken image. Locally
    the test is skipped. Without pytest (benchmark scripts) a RuntimeError
    carries the same hint.
    """
    path = shutil.which(name) or shutil.which(name, path=_SBIN_PATH)
    if path:
        return path
    if _under_ci():
        raise RuntimeError(f"{name} missing under CI: install Debian package {package}")
    reason = f"{name} not found: apt-get install {package}"
    try:
        import pytest
    except ImportError:
        raise RuntimeError(reason) from None
    pytest.skip(reason)
    raise AssertionError("unreachable")  # pytest.skip() always raises


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log_files: Sequence[Path] = (),
    interval: float = 0.02,
) -> None:
    """Poll ``predicate`` until it is true; fail early if ``proc`` died.

    Polling with a short interval keeps start-up fast (servers are usually
    ready in tens of milliseconds) while the deadline bounds a hung start.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if proc is not None and not process_running(proc):
            raise RuntimeError(f"{what}: process exited" + _log_tail(log_files))
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.1f}s" + _log_tail(log_files))
        time.sleep(interval)


def _log_tail(log_files: Sequence[Path], lines: int = 20) -> str:
    parts: list[str] = []
    for path in log_files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        tail = "\n".join(text.splitlines()[-lines:])
        if tail:
            parts.append(f"\n--- {path} ---\n{tail}")
    return "".join(parts)


def _parent_death_hook() -> Callable[[], None] | None:
    """Return a pre-exec hook making the child get SIGTERM if we die.

    This is what keeps a killed pytest/benchmark from leaving servers
    behind. Linux only, and only from the main thread: PDEATHSIG fires when
    the *thread* that forked exits. ctypes is loaded here, in the parent,
    because importing after fork() can deadlock.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # parent died before prctl took effect
            os._exit(1)

    return hook


class _Stoppable(Protocol):
    def stop(self) -> None: ...


# Strong references: a started server that the caller forgot to stop must
# still be stopped at exit.
_live: set[_Stoppable] = set()


def _register(server: _Stoppable) -> None:
    """Remember a started server so it is stopped at interpreter exit."""
    _live.add(server)


def _unregister(server: _Stoppable) -> None:
    _live.discard(server)


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop()


def start_process(
    argv: Sequence[str], *, cwd: Path, output: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a server child in its own session with stdout/stderr to a file.

    Its own session lets ``stop_process`` kill the whole process group
    (Dovecot forks many helpers) and keeps a terminal Ctrl-C from racing our
    orderly shutdown.
    """
    out: IO[bytes]
    with open(output, "ab") as out:
        return subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_parent_death_hook(),
            env=env,
        )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0, *, graceful: bool = True) -> None:
    """SIGTERM and wait up to ``timeout``, then SIGKILL the whole group.

    ``graceful=False`` skips the SIGTERM: an instant, crash-like stop.
    Idempotent. The group kill also ends helpers a daemon left behind; it is
    sent while the leader is still an unreaped zombie, so its pid (= the
    group id) cannot have been recycled for somebody else's group.
    """
    if proc.returncode is not None:
        return  # already reaped: never signal a possibly recycled id
    if graceful:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)  # Popen.send_signal would reap
        deadline = time.monotonic() + timeout
        while not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # SIGKILL is asynchronous; wait so callers (and `pgrep`) see no helper
    # running when stop() returns. Only probing, so a recycled id costs at
    # most this delay.
    deadline = time.monotonic() + 2.0
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def group_alive(pgid: int) -> bool:
    """True while a non-zombie process is left in process group ``pgid``.

    Zombies are ignored: orphaned helpers are reaped by init, which in some
    containers takes seconds, but they hold no ports or files. Reads /proc
    on Linux, elsewhere falls back to a signal-0 probe.
    """
    proc_root = Path("/proc")
    if not (proc_root / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for stat in proc_root.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            return True
    return False


def process_running(proc: subprocess.Popen[bytes]) -> bool:
    """Like ``proc.poll() is None`` but never reaps the child.

    Keeping a dead leader unreaped keeps its pid (our process-group id)
    reserved, so ``stop_process`` can still safely kill leftover helpers.
    """
    return proc.returncode is None and not _exited(proc.pid)


def _exited(pid: int) -> bool:
    """True once the child has exited, without reaping it (WNOWAIT)."""
    try:
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_PID, pid, flags) is not None
    except ChildProcessError:
        return True


class OnePort:
    """A server on one TCP port: a free one chosen on first use (unless given: `_port`), kept across restarts, so
    a server stopped and started again comes back on the same address."""

    _port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            self._port = free_port()
        return self._port


class ChildServer:
    """What every throw-away server here shares: a private directory, a child process, a context manager."""

    _tmpdir: Path | None = None
    _proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self, *, graceful: bool = True) -> None:
        """Stop the server, delete its directory; idempotent. ``graceful=False`` SIGKILLs, like a crash."""
        self._kill(graceful)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        _unregister(self)

    def _kill(self, graceful: bool = True) -> None:
        """End the server's processes (a server whose helpers outlive its leader overrides this)."""
        if self._proc is not None:
            stop_process(self._proc, graceful=graceful)
            self._proc = None

    @property
    def tmpdir(self) -> Path:
        """The server's private directory (exists while started)."""
        if self._tmpdir is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._tmpdir

    @property
    def running(self) -> bool:
        """True while the server's child process is alive."""
        return self._proc is not None and process_running(self._proc)

    @property
    def pid(self) -> int | None:
        """PID of the child process (also its process-group id)."""
        return self._proc.pid if self.running and self._proc else None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def __getattr__(name: str) -> object:
    """Import server classes lazily so helpers load without side effects."""
    if name == "RedisServer":
        from .redis import RedisServer

        return RedisServer
    if name == "DovecotServer":
        from .dovecot import DovecotServer

        return DovecotServer
    if name == "PostfixServer":
        from .postfix import PostfixServer

        return PostfixServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
