"""A fresh ext4 file system for one benchmark run, on a loop device.

On a file system that has aged, what creating a file costs depends on where ext4 happens to place the
directory: on the machine the README's figures come from, two fresh directories of the same disk measured
15 us and 800 us per file, and a run's result followed that draw more than any change to the code. A new
file system, made for the run and removed afterwards, takes that out. Durability is unchanged: an fsync on
the loop device's file system flushes its backing file on the real disk, so the journal's and Dovecot's
flushes still reach the disk.

Both servers of a benchmark run on it (the gateway's journal and Dovecot's Maildir alike), so the comparison
stays fair. Needs root, ``mkfs.ext4`` (e2fsprogs) and ``mount``; ``--scratch tmpdir`` runs without them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

CHOICES = ("auto", "ext4", "tmpdir")
HELP = (
    "where the spools and Maildirs live: ext4 = a fresh ext4 file system on a loop device, made for the run "
    "(root only; reproducible), tmpdir = $TMPDIR as it is; auto (default) = ext4 when possible"
)


def ext4_unavailable() -> str | None:
    """Why a loop-mounted ext4 cannot be made here, or None."""
    if os.geteuid() != 0:
        return "not root (mounting a loop device needs root)"
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"{tool} not found (apt-get install e2fsprogs mount)"
    return None


def _run(*argv: str) -> None:
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")


@contextlib.contextmanager
def scratch_dir(choice: str, size_mb: int = 4096) -> Iterator[tuple[Path, str]]:
    """Yield (directory, description) and make it the default for `tempfile` (and $TMPDIR for children)."""
    reason = ext4_unavailable() if choice in ("auto", "ext4") else None
    if choice == "tmpdir" or (choice == "auto" and reason is not None):
        where = Path(tempfile.gettempdir())
        yield where, f"{where} ({reason})" if reason else str(where)
        return
    if reason is not None:
        raise RuntimeError(f"--scratch ext4: {reason}")
    image_fd, image = tempfile.mkstemp(prefix="bench-fs-", suffix=".img", dir="/var/tmp")
    os.close(image_fd)
    mountpoint = Path(tempfile.mkdtemp(prefix="bench-fs-"))
    mounted = False
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    try:
        os.truncate(image, size_mb << 20)  # sparse: only what is written takes space
        # Inode tables and the journal initialised now, not lazily in the background during the run.
        _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", image)
        _run("mount", "-o", "loop", image, str(mountpoint))
        mounted = True
        mountpoint.chmod(0o1777)  # like /tmp: Dovecot's mail user must reach its Maildir
        tempfile.tempdir = str(mountpoint)
        os.environ["TMPDIR"] = str(mountpoint)
        yield mountpoint, f"fresh ext4 of {size_mb} MiB on a loop device (image in /var/tmp)"
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]
        if mounted:
            try:
                _run("umount", str(mountpoint))
            except RuntimeError:
                _run("umount", "-l", str(mountpoint))  # something still holds it: detach now, freed when let go
        with contextlib.suppress(OSError):
            mountpoint.rmdir()
        with contextlib.suppress(OSError):
            os.unlink(image)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def measure_on_scratch(choice: str, measure: Callable[[str], int], holds: str = "spools and Maildirs") -> int:
    """Run a benchmark's `measure(description)` with its files on the scratch file system chosen; its exit status.
    SIGTERM and SIGHUP (``timeout``, a closed terminal) end it as an exception does, so the servers are stopped
    and the file system is unmounted and removed rather than left mounted."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    with scratch_dir(choice) as (_, described):
        print(f"{holds} on: {described}", file=sys.stderr)
        return measure(described)
