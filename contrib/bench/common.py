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
from dataclasses import dataclass, field
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


# The journal's states (``deferred/`` since 2a97207); an entry is one ``<id>.json`` (+ ``<id>.eml``) in one of them.
JOURNAL_STATES = ("pending", "deferred", "delivered", "dropped", "failed")


def journal_shards(spool: Path) -> list[Path]:
    """Every journal shard under ``spool``: the spool itself (worker 0, and a single process), then
    ``shard-1``, ``shard-2`` ... (worker k of ``serve --workers N``), in worker order. Read from the directory,
    not from the gateway's code, so it also reads the journal of a gateway from before shards."""
    numbered = []
    with contextlib.suppress(FileNotFoundError):
        for path in spool.iterdir():
            name = path.name
            if name.startswith("shard-") and name[6:].isdigit() and name[6] != "0" and path.is_dir():
                numbered.append((int(name[6:]), path))
    return [spool, *(path for _, path in sorted(numbered))]


@dataclass
class JournalContents:
    """What a gateway's journal holds, over all its shards."""

    counts: dict[str, int]  # entries per state (JOURNAL_STATES), plus quarantine/ (entries set aside)
    per_shard: dict[str, dict[str, int]]  # the same per shard ("spool", "shard-1" ...): how the load was spread
    entries: int  # .json files in every state of every shard
    distinct_ids: int  # an id in two states or two shards would be one message journalled twice
    tmp_files: int  # left in the shards' tmp/ (nothing should be, after a clean stop)
    handoff: list[float] = field(default_factory=list)  # finished_at - received_at of delivered entries, seconds
    finished_at: list[float] = field(default_factory=list)  # wall-clock times the delivered entries finished


def read_journal(spool: Path) -> JournalContents:
    """Count every entry of every shard and state, and read the delivered ones' times.

    Hand-off (``finished_at - received_at``): ``received_at`` is taken once DATA is complete, before the journal
    commit; ``finished_at`` when the entry moved to ``delivered/``, after the sink (Redis) confirmed the job. So it
    covers the commit and its flush, the dispatcher's queue and the push: how long a message waits between
    Postfix handing it over and GitLab being able to see it.
    """
    counts = dict.fromkeys((*JOURNAL_STATES, "quarantine"), 0)
    per_shard: dict[str, dict[str, int]] = {}
    ids: set[str] = set()
    entries = tmp_files = 0
    handoff: list[float] = []
    finished: list[float] = []
    for root in journal_shards(spool):
        shard = "spool" if root == spool else root.name
        here = per_shard.setdefault(shard, {})
        for state in JOURNAL_STATES:
            files = list((root / state).glob("*.json"))
            here[state] = len(files)
            counts[state] += len(files)
            entries += len(files)
            ids.update(path.stem for path in files)
            if state != "delivered":
                continue
            for path in files:
                try:
                    meta = json.loads(path.read_bytes())
                except (OSError, ValueError):
                    continue  # counted; its missing latency shows as fewer samples than entries
                if meta.get("finished_at") is not None and meta.get("received_at") is not None:
                    handoff.append(meta["finished_at"] - meta["received_at"])
                    finished.append(meta["finished_at"])
        quarantined = {p.name.rpartition(".")[0] for p in (root / "quarantine").glob("*") if p.is_file()}
        here["quarantine"] = len(quarantined)
        counts["quarantine"] += len(quarantined)
        tmp_files += sum(1 for p in (root / "tmp").glob("*") if p.is_file())
    return JournalContents(counts, per_shard, entries, len(ids), tmp_files, handoff, finished)


# --- processes ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    """One process's CPU so far (clock ticks, all its threads), from ``/proc/PID/stat``."""

    pid: int
    ppid: int
    start: int  # field 22, start time: with the pid, who the process is (pids are recycled)
    own: int  # utime + stime (fields 14, 15)
    reaped: int  # cutime + cstime (fields 16, 17): its children that exited and were waited for
    name: str
    system: int = 0  # stime (field 15): of `own`, the time in the kernel on its behalf

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start)


def proc_stat(pid: int, tid: int | None = None) -> ProcStat | None:
    """``/proc/PID/stat`` (or one thread's, ``/proc/PID/task/TID/stat``), None once the process is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path, "rb") as stat:
            head, tail = stat.read().decode(errors="replace").rsplit(")", 1)
        fields = tail.split()  # fields[0] is field 3 (state)
        own, reaped = int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])
        name = head.split("(", 1)[1]
        return ProcStat(pid, int(fields[1]), int(fields[19]), own, reaped, name, int(fields[12]))
    except (OSError, ValueError, IndexError):
        return None


def all_processes() -> dict[int, ProcStat]:
    """Every process on the machine (a couple of milliseconds for a hundred processes)."""
    found: dict[int, ProcStat] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            found[stat.pid] = stat
    return found


def process_tree(root: int, processes: dict[int, ProcStat] | None = None) -> dict[tuple[int, int], ProcStat]:
    """``root`` and all its descendants (by ppid), keyed by (pid, start time); empty if ``root`` is gone."""
    processes = all_processes() if processes is None else processes
    if root not in processes:
        return {}
    children: dict[int, list[ProcStat]] = {}
    for stat in processes.values():
        children.setdefault(stat.ppid, []).append(stat)
    tree: dict[tuple[int, int], ProcStat] = {}
    todo = [processes[root]]
    while todo:
        stat = todo.pop()
        tree[stat.key] = stat
        todo.extend(child for child in children.get(stat.pid, []) if child.key not in tree)
    return tree


def tree_cpu_ticks(before: dict[tuple[int, int], ProcStat], after: dict[tuple[int, int], ProcStat]) -> int:
    """CPU ticks a process tree used between two snapshots (``process_tree``), its exited members included.

    A process that exits is reaped by its parent, whose cutime/cstime then hold its whole life (its own
    reaped children's too). So: every member's own and reaped time now, less what it had at the first
    snapshot; and for a member that was there at the first snapshot and is gone now, what it had then is in
    its parent's reaped time again, once too many, so it is taken off. (A member reparented to init when its
    parent died is lost; the gateway's workers and Dovecot's helpers die with their parent.)
    """
    ticks = 0
    for key, stat in after.items():
        old = before.get(key)
        ticks += stat.own + stat.reaped - ((old.own + old.reaped) if old else 0)
    for key, old in before.items():
        if key not in after:
            ticks -= old.own + old.reaped
    return ticks


def tree_ticks_now(root: int) -> int | None:
    """Own and reaped ticks of ``root``'s tree as it is now: grows while the tree works (for ``settle``)."""
    tree = process_tree(root)
    return sum(stat.own + stat.reaped for stat in tree.values()) if tree else None


def settle(roots: list[int], interval: float = 0.1, quiet: int = 1, limit: float = 10.0) -> float:
    """Wait until the trees of ``roots`` have gone quiet (two intervals in a row with at most ``quiet``
    ticks each, i.e. below ~10% of a core at 100 Hz), so what they still do for the messages (a journal
    entry's move to ``delivered/``, a log line) is counted; returns the seconds waited, ``limit`` at most."""
    started = time.perf_counter()
    last = [tree_ticks_now(root) for root in roots]
    calm = 0
    while calm < 2 and time.perf_counter() - started < limit:
        time.sleep(interval)
        now = [tree_ticks_now(root) for root in roots]
        busy = any(a is not None and b is not None and b - a > quiet for a, b in zip(last, now, strict=True))
        calm = 0 if busy else calm + 1
        last = now
    return time.perf_counter() - started


def proc_status_mb(pid: int, key: str) -> float | None:
    """A memory figure (``VmHWM``: peak resident set, ``VmRSS``: current) from ``/proc/PID/status``, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def cmdline(pid: int) -> list[str]:
    """A process's argv, empty once it is gone."""
    try:
        return [arg.decode(errors="replace") for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    except OSError:
        return []


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
