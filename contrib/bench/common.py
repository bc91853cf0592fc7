"""What the benchmarks beside this file share, in one copy, so that they measure and report alike.

Each benchmark is a script run from the repository root (``python contrib/bench/x.py``), which puts only this
directory on sys.path; importing this module puts the repository root there too, so ``tests.servers`` (the
throw-away Redis, Dovecot and Postfix) imports after it. The rest is what two or more of the scripts need: the
gateway's reply-key recipient and Sidekiq queue, finding and snapshotting the gateway's code, the checks of what
arrived, the machine's figures, and the report's formatting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.servers import require_binary  # noqa: E402  (the repository root must be on sys.path first)
from tests.servers.dovecot import dovecot_version  # noqa: E402
from tests.servers.redis import RedisServer  # noqa: E402

# A valid reply key: routed to incoming_email, handler create_note, so every message becomes a Sidekiq job.
REPLY_KEY = "59d8df8370b7e95c5a49fbf86aeb2c93"
GATEWAY_RCPT = f"incoming+{REPLY_KEY}@localhost"
QUEUE_KEY = "queue:default"  # GitLab renders `:queue: default` for incoming_email; the gateway's default too
WORKER = "EmailReceiverWorker"


# --- the gateway under test --------------------------------------------------------------------------------


def gateway_script() -> str:
    """The venv's ``lmtp-gateway`` console script (the package installed editable), else the one on PATH."""
    script = REPO / ".venv" / "bin" / "lmtp-gateway"
    return str(script) if script.exists() else require_binary("lmtp-gateway", "lmtp-gateway (pip)")


def greets(port: int) -> bool:
    """True once something on ``port`` sends an LMTP greeting: the gateway is ready, not merely bound."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            return sock.recv(512).startswith(b"220 ")
    except OSError:
        return False


def code_digest(root: Path) -> str:
    """A short digest of the gateway's Python files under ``root``: which code was measured."""
    digest = hashlib.sha256()
    for path in sorted((root / "lmtp_gateway").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def snapshot_code(workdir: Path, ref: str | None) -> Path:
    """Copy the ``lmtp_gateway`` package aside and make every gateway start import that copy.

    Others edit the gateway while a benchmark runs (it happened while the README's numbers were taken: two
    runs of one benchmark measured two versions). A frozen copy, put first on PYTHONPATH, keeps all runs on
    one version; the console script and ``python -m`` both find it before the editable install. ``ref`` takes
    the copy from a git commit instead of the working tree, to compare versions.
    """
    root = workdir / "code"
    if ref is None:
        shutil.copytree(REPO / "lmtp_gateway", root / "lmtp_gateway", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        root.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", ref, "lmtp_gateway"], capture_output=True
        )
        if archive.returncode != 0:
            raise SystemExit(f"--ref {ref}: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(root))
    return root


def git_state(ref: str | None) -> dict[str, Any]:
    """The commit the snapshot was taken from and, for the working tree, the gateway files that differed."""
    state: dict[str, Any] = {"ref": ref or "working tree"}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(REPO)]
        head = subprocess.run([*git, "rev-parse", "--short", ref or "HEAD"], capture_output=True, text=True)
        state["commit"] = head.stdout.strip()
        if ref is None:
            dirty = subprocess.run(
                [*git, "status", "--porcelain", "--", "lmtp_gateway"], capture_output=True, text=True
            )
            state["uncommitted"] = [line[3:] for line in dirty.stdout.splitlines()]
    return state


# --- what arrived ------------------------------------------------------------------------------------------


def queued_jobs(redis: RedisServer) -> list[dict[str, Any]]:
    """Every Sidekiq job in ``queue:default``, read in chunks (a run leaves thousands there)."""
    length = redis.command("LLEN", QUEUE_KEY)
    assert isinstance(length, int)
    jobs: list[dict[str, Any]] = []
    for start in range(0, length, 500):
        batch = redis.command("LRANGE", QUEUE_KEY, start, start + 499, timeout=30.0)
        assert isinstance(batch, list)
        for raw in batch:
            assert isinstance(raw, bytes)
            jobs.append(json.loads(raw))
    return jobs


def log_problems(path: Path) -> list[str]:
    """Gateway log lines worth reporting: warnings and errors (JSON lines), anything else unexpected."""
    problems: list[str] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return problems
    for line in lines:
        if not line.strip() or line.startswith("lmtp-gateway: listening on"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            problems.append(line)
            continue
        if not isinstance(record, dict) or record.get("level") not in ("debug", "info"):
            problems.append(line)
    return problems


def summarize(lines: list[str], limit: int = 5, key: Callable[[str], str] = lambda line: line[:300]) -> list[str]:
    """The first few distinct lines, with a count: enough to see what went wrong without drowning in it.

    ``key`` is what is counted and shown of a line: by default its first 300 characters.
    """
    distinct: dict[str, int] = {}
    for line in lines:
        shown_as = key(line)
        distinct[shown_as] = distinct.get(shown_as, 0) + 1
    shown = [f"{n}x {line}" if n > 1 else line for line, n in list(distinct.items())[:limit]]
    if len(distinct) > limit:
        shown.append(f"... and {len(distinct) - limit} more distinct lines")
    return shown


# --- the machine -------------------------------------------------------------------------------------------


def cpu_times() -> dict[str, int]:
    """Jiffies of all CPUs since boot (from /proc/stat): was the machine saturated (busy), waiting for the disk
    (iowait), or robbed by the hypervisor (steal) while a server ran?"""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    values += [0] * (8 - len(values))
    total = sum(values)
    return {
        "busy": total - values[3] - values[4],
        "iowait": values[4],
        "interrupts": values[5] + values[6],  # irq + softirq: loopback TCP is mostly softirq work
        "steal": values[7],
        "total": total,
    }


def load_at_start() -> tuple[float, float, float]:
    """The load average now, with a warning if the machine is busy already: the numbers would be noisy."""
    load = os.getloadavg()
    if load[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load[0]:.1f} at the start: numbers will be noisy", file=sys.stderr)
    return load


def file_create_us(directory: Path, count: int = 300) -> float:
    """Mean cost of creating an empty file where the spools live, in microseconds.

    The gateway creates and renames several files per message (on its event-loop thread up to 44f7efd, in
    one writer thread since 64c10ce), so this one figure explains much of the variation between machines and
    between runs on a busy shared machine (it swung from 60 us to 1 ms on the machine the README's numbers
    come from).
    """
    probe = Path(tempfile.mkdtemp(prefix="create-probe-", dir=directory))
    try:
        started = time.perf_counter()
        for n in range(count):
            os.close(os.open(probe / str(n), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return (time.perf_counter() - started) / count * 1e6
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def machine() -> dict[str, Any]:
    """Enough about the machine and versions to compare results across runs."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": subprocess.run(
            [require_binary("redis-server", "redis-server"), "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "dovecot": ".".join(map(str, dovecot_version(require_binary("dovecot", "dovecot-core")))),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["postfix"] = subprocess.run(
            ["postconf", "-h", "mail_version"],
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        ).stdout.strip()
    return info


# --- the report --------------------------------------------------------------------------------------------


def percentiles_ms(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 in milliseconds (inclusive method: exact on small samples, no extrapolation)."""
    if len(values) < 2:
        only = values[0] * 1000 if values else None
        return {"p50": only, "p90": only, "p99": only, "max": only}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49] * 1000, "p90": cuts[89] * 1000, "p99": cuts[98] * 1000, "max": max(values) * 1000}


def median(values: list[float | None]) -> float | None:
    """Median of the successful runs; None if a run failed (a failed run has no honest speed)."""
    if not values or any(v is None for v in values):
        return None
    return statistics.median(v for v in values if v is not None)


def fmt(value: float | None, spec: str = ".0f") -> str:
    """A figure for a table, ``-`` where there is none (a failed run)."""
    return "-" if value is None else format(value, spec)
