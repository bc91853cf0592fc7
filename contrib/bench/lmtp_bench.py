"""LMTP throughput benchmark: lmtp-gateway (Sidekiq sink, fsync on) against Dovecot LMTP (Maildir).

Both servers get the same load from Postfix's ``smtp-source`` (LMTP, connection reuse, N messages of SIZE
bytes over S parallel sessions), so the gateway's numbers can be read against a well-known, native LMTP
server on the same machine: Dovecot is the anchor, the ratio is what matters.

The gateway runs ``serve`` with ``lmtp.workers: N`` (``--workers``, default 2): a supervisor and N worker
processes sharing the listener, each with its journal shard. Its rate is taken when the last job is in Redis
(``LLEN queue:default`` = messages, polled from the start of ``smtp-source``): that is when GitLab can see all
the mail. Dovecot's is taken when ``smtp-source`` is done: its delivery is complete when it answers. The CPU
each side used is read from /proc for the whole process tree (the gateway's supervisor and workers, Dovecot's
master and all its helpers, exited ones included), and Redis's separately.

Every run starts from a clean slate (a fresh gateway with an empty journal and an empty Redis, a fresh
Dovecot with an empty Maildir) and is checked afterwards: one Sidekiq job per message in ``queue:default``
(each an ``EmailReceiverWorker`` with its own jid) and one journal entry per message over all the shards, all
delivered, or one Maildir file per message for Dovecot. A throughput figure for mail that did not arrive would
be worthless.

Run from the repository root::

    .venv/bin/python contrib/bench/lmtp_bench.py [--messages 5000] [--sessions 1,16] [--workers 2]

Each configuration runs ``--repeat`` times (default 3, alternating which server goes first) and the median is
reported. The gateway code is snapshotted at the start (``--ref COMMIT`` takes it from git instead), so edits
made while the benchmark runs do not leak into it. ``--profile DIR`` runs every gateway process (supervisor and
workers) under cProfile (slower: use it to find hotspots, not for the numbers; it sees each process's main
thread, the event loop, only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Beside this file; importing common first also puts the repository root on sys.path, for tests.servers.
from common import (
    GATEWAY_RCPT,
    QUEUE_KEY,
    REPO,
    WORKER,
    ProcStat,
    all_processes,
    cmdline,
    code_digest,
    cpu_times,
    file_create_us,
    fmt,
    gateway_script,
    git_state,
    greets,
    load_at_start,
    log_problems,
    machine,
    median,
    percentiles_ms,
    proc_stat,
    proc_status_mb,
    process_tree,
    queued_jobs,
    read_journal,
    settle,
    snapshot_code,
    summarize,
    tree_cpu_ticks,
)
from scratch import CHOICES, measure_on_scratch
from scratch import HELP as SCRATCH_HELP

from tests.servers import free_port, process_running, require_binary, start_process, stop_process, wait_until
from tests.servers.dovecot import DovecotServer
from tests.servers.redis import RedisServer

DOVECOT_RCPT = "gitlab@localhost"
SENDER = "bench@localhost"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results-lmtp.json"
QUEUE_POLL_S = 0.01  # LLEN over one kept-open connection: ~100 cheap commands a second, the rate's resolution
QUEUE_STALL_S = 10.0  # after smtp-source ended, give up on the queue when it has not grown for this long
QUEUE_DRAIN_LIMIT_S = 120.0  # ... and in any case this long after smtp-source ended
TICK = os.sysconf("SC_CLK_TCK")

GATEWAY_CONFIG = """\
gitlab:
  host: localhost
incoming_email:
  address: "incoming+%{{key}}@localhost"
  delivery_method: sidekiq
lmtp:
  listen: "127.0.0.1:{port}"
  max_message_size: 25M
  {workers_line}
spool:
  path: {spool}
  {sync_line}
redis:
  url: {redis_url}
{monitoring}"""

# Put first on a gateway's PYTHONPATH with --profile: every Python process of the gateway (the supervisor and
# each worker it spawns with `python -m lmtp_gateway`) profiles its main thread and writes PREFIX-PID.prof at exit.
PROFILE_HOOK = """\
import atexit
import cProfile
import os

_prefix = os.environ.get("LMTP_BENCH_PROFILE")
if _prefix:
    _profile = cProfile.Profile()

    def _dump():
        _profile.disable()
        _profile.dump_stats(f"{_prefix}-{os.getpid()}.prof")

    atexit.register(_dump)
    _profile.enable()
"""


def gateway_schema() -> dict[str, Any]:
    """The configuration schema of the code being measured (the snapshot, first on sys.path)."""
    from lmtp_gateway.config import SCHEMA

    return SCHEMA


def spool_sync_line(method: str) -> str:
    """The spool's durability setting in the syntax of the gateway being measured.

    Older gateways take ``fsync: true|false``, newer ones ``sync: fsync|syncfs|off``; the schema of the code
    being measured says which, so the benchmark works across versions and never measures a configuration the
    gateway would reject.
    """
    keys = gateway_schema().get("spool", {})
    if "sync" in keys:
        return f"sync: {method}"
    if "fsync" in keys and method in ("fsync", "off"):
        return f"fsync: {'true' if method == 'fsync' else 'false'}"
    raise SystemExit(f"--sync {method}: not supported by this gateway (spool keys: {', '.join(keys)})")


def workers_line(workers: int) -> str:
    """``workers: N`` for the lmtp section; nothing for a gateway from before workers, which is one process."""
    if "workers" in gateway_schema().get("lmtp", {}):
        return f"workers: {workers}"
    if workers == 1:
        return "# this gateway has no lmtp.workers: one process"
    raise SystemExit(f"--workers {workers}: this gateway has no lmtp.workers (it runs one process); use --workers 1")


def monitoring_section(port: int) -> str:
    """/metrics on a free port rather than the default 9425, which another gateway on the machine may hold."""
    if "monitoring" in gateway_schema():
        return f'monitoring:\n  listen: "127.0.0.1:{port}"\n'
    return ""


@dataclass
class SourceRun:
    """One smtp-source invocation: how long it took, whether it finished cleanly, and (for the gateway) when
    the last job was in Redis. Times are seconds from smtp-source's start."""

    seconds: float  # until smtp-source exited: every message had its 250 (and QUIT its 221)
    exit_code: int | None  # None: killed after the time limit
    stderr: str
    started_wall: float  # time.time() at the start, to place the journal's timestamps
    queue_seconds: float | None = None  # until LLEN queue:default reached the count; None: it never did
    queue_length: int | None = None  # the last LLEN seen
    queue_error: str | None = None  # polling Redis failed
    done_seconds: float = 0.0  # the end of the measured window: queue_seconds for the gateway, else seconds
    machine_busy_cores: float | None = None  # every process and the kernel, over the measured window
    snap_start: Any = None  # `snapshot()` just before smtp-source started
    snap_done: Any = None  # ... and at the end of the measured window

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class ServerResult:
    """What one server did with one load: speed, CPU, and the proof that every message arrived."""

    server: str
    sessions: int
    messages: int
    seconds: float | None = None  # the headline window: to the last job in Redis (gateway), smtp-source's end
    msgs_per_s: float | None = None
    delivered: int = 0  # jobs in Redis / files in the Maildir
    ok: bool = False
    errors: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list, repr=False)  # seconds; pooled over repeats, not saved

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["latencies"]
        return data


# --- the load and its clock --------------------------------------------------------------------------------


class QueueLength:
    """``LLEN`` of one list over one connection kept open: polling must cost Redis (whose CPU is reported)
    and this process as little as possible, and a new connection per poll would not."""

    def __init__(self, host: str, port: int, key: str) -> None:
        self._sock = socket.create_connection((host, port), timeout=5.0)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = self._sock.makefile("rb")
        self._command = b"*2\r\n$4\r\nLLEN\r\n$%d\r\n%s\r\n" % (len(key), key.encode())

    def __call__(self) -> int:
        self._sock.sendall(self._command)
        line = self._reader.readline()
        if not line.startswith(b":"):
            raise RuntimeError(f"LLEN: unexpected reply {line!r}")
        return int(line[1:])

    def close(self) -> None:
        self._reader.close()
        self._sock.close()


def run_smtp_source(
    binary: str,
    *,
    port: int,
    rcpt: str,
    messages: int,
    sessions: int,
    size: int,
    timeout: float,
    queue: Callable[[], int] | None = None,
    snapshot: Callable[[], Any] = lambda: None,
) -> SourceRun:
    """Time one smtp-source run; kill it (and say so) if it outlives ``timeout``.

    ``-d`` keeps each session's connection open for all its messages, as Postfix's LMTP client does with
    connection caching; without ``-A`` any unexpected reply (a 4xx deferral, a 5xx) aborts with a non-zero
    exit, so a clean exit means every message got its 250.

    With ``queue`` (the gateway), ``queue()`` (LLEN) is polled every QUEUE_POLL_S from the start, in this
    thread, while another waits for smtp-source, and the measured window ends when it reaches ``messages``:
    the time is exact to a poll interval. Without it the window ends when smtp-source exits. ``snapshot`` is
    called just before the start and at the end of the window (the CPU counters).
    """
    argv = [binary, "-L", "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    argv += ["-f", SENDER, "-t", rcpt, f"127.0.0.1:{port}"]
    outcome: dict[str, Any] = {}
    exited = threading.Event()
    snap_start = snapshot()
    busy_before = cpu_times()["busy"]
    started_wall, started = time.time(), time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait_for_source() -> None:
        try:
            out, err = proc.communicate(timeout=timeout)
            outcome["exit_code"] = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            outcome["exit_code"] = None
        outcome["seconds"] = time.perf_counter() - started
        outcome["text"] = (out + err).decode(errors="replace").strip()
        exited.set()

    waiter = threading.Thread(target=wait_for_source, name="smtp-source", daemon=True)
    waiter.start()
    queue_seconds: float | None = None
    length: int | None = None
    queue_error: str | None = None
    if queue is None:
        waiter.join()
        done = started + outcome["seconds"]
    else:
        grown_at = started
        while True:
            try:
                now_length = queue()
            except (OSError, RuntimeError) as error:
                queue_error = f"polling {QUEUE_KEY} failed: {error}"
                break
            now = time.perf_counter()
            if now_length >= messages:
                queue_seconds, length = now - started, now_length
                break
            if now_length != length:
                length, grown_at = now_length, now
            if exited.is_set():
                source_end = started + outcome["seconds"]
                if now - max(grown_at, source_end) > QUEUE_STALL_S or now - source_end > QUEUE_DRAIN_LIMIT_S:
                    break
            time.sleep(QUEUE_POLL_S)
        done = time.perf_counter()
    snap_done = snapshot()
    busy = (cpu_times()["busy"] - busy_before) / TICK
    waiter.join()
    return SourceRun(
        seconds=outcome["seconds"],
        exit_code=outcome["exit_code"],
        stderr=outcome["text"],
        started_wall=started_wall,
        queue_seconds=queue_seconds,
        queue_length=length,
        queue_error=queue_error,
        done_seconds=done - started,
        machine_busy_cores=busy / (done - started),
        snap_start=snap_start,
        snap_done=snap_done,
    )


def record_source(result: ServerResult, run: SourceRun, messages: int) -> None:
    """smtp-source's time and failure (exit code, output) if any; the rate at smtp-source's end."""
    result.extra["source_seconds"] = run.seconds
    result.extra["machine_busy_cores"] = run.machine_busy_cores
    if run.ok:
        result.extra["msgs_per_s_at_last_250"] = messages / run.seconds
    elif run.exit_code is None:
        result.errors.append(f"smtp-source killed after {run.seconds:.1f} s: {run.stderr[-500:]}")
    else:
        result.errors.append(f"smtp-source exit {run.exit_code}: {run.stderr[-500:]}")
    if run.ok and run.stderr:
        result.errors.append(f"smtp-source said: {run.stderr[-500:]}")


# --- the gateway -------------------------------------------------------------------------------------------


def gateway_argv(config: Path) -> list[str]:
    """The installed console script (it imports the snapshot: PYTHONPATH)."""
    return [gateway_script(), "serve", "--config", str(config), "--log-level", "warning"]


def profile_env(workdir: Path, prefix: Path) -> dict[str, str]:
    """The environment of a profiled gateway: PROFILE_HOOK first on PYTHONPATH, the files' prefix."""
    hook = workdir / "profile-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(PROFILE_HOOK)
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "LMTP_BENCH_PROFILE": str(prefix)}


def worker_index(pid: int) -> int | None:
    """A worker's index from its command line (``serve ... --worker-seat {"index": k, ...}``), else None."""
    argv = cmdline(pid)
    try:
        return int(json.loads(argv[argv.index("--worker-seat") + 1])["index"])
    except (ValueError, IndexError, KeyError, TypeError):
        return None


@dataclass
class GatewayProcesses:
    """Who is who in the gateway's process tree: the supervisor (None when one process does everything) and the
    workers by index (the single process is worker 0)."""

    supervisor: ProcStat | None
    workers: dict[int, ProcStat]
    others: list[ProcStat]  # anything else in the tree (there should be nothing)


def gateway_processes(root: int, tree: dict[tuple[int, int], ProcStat], expected: int) -> GatewayProcesses:
    members = sorted(tree.values(), key=lambda stat: stat.pid)
    top = next((stat for stat in members if stat.pid == root), None)
    if top is None:
        return GatewayProcesses(None, {}, [])
    if expected == 1 and worker_index(root) is None and not any(stat.ppid == root for stat in members):
        return GatewayProcesses(None, {0: top}, [])
    workers: dict[int, ProcStat] = {}
    others: list[ProcStat] = []
    for stat in members:
        if stat.pid == root:
            continue
        index = worker_index(stat.pid) if stat.ppid == root else None
        if index is None or index in workers:
            others.append(stat)
        else:
            workers[index] = stat
    return GatewayProcesses(top, dict(sorted(workers.items())), others)


def gateway_snapshot(root: int, redis_pid: int | None) -> dict[str, Any]:
    """The CPU counters of the gateway's tree, of each member's main thread (the event loop), and of Redis."""
    processes = all_processes()
    tree = process_tree(root, processes)
    threads = {key: thread.own for key, stat in tree.items() if (thread := proc_stat(stat.pid, stat.pid)) is not None}
    redis = process_tree(redis_pid, processes) if redis_pid else {}
    return {"tree": tree, "threads": threads, "redis": redis, "at": time.perf_counter()}


def wait_ready(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    """Until the gateway said it is listening (a supervisor says so once every worker is ready; one worker may
    greet before) and greets on its port."""

    def ready() -> bool:
        try:
            said = log_path.read_text(errors="replace")
        except OSError:
            return False
        return "lmtp-gateway: listening on" in said and greets(port)

    wait_until(ready, timeout=60, what="lmtp-gateway", proc=proc, log_files=[log_path])


def check_jobs(redis: RedisServer, expected: int) -> tuple[int, int, list[str]]:
    """(jobs, distinct jids, problems) for ``queue:default``, reading every job in chunks.

    The jid is the journal id, derived from the message bytes, so distinct jids also prove that no two
    messages were collapsed by the gateway's dedupe.
    """
    jobs = queued_jobs(redis)
    jids = {job.get("jid") for job in jobs}
    wrong = [job.get("class") for job in jobs if job.get("class") != WORKER]
    problems = [f"job class {name!r}, expected {WORKER}" for name in wrong[:5]]
    if len(jobs) != expected:
        problems.append(f"{len(jobs)} jobs in {QUEUE_KEY}, expected {expected}")
    return len(jobs), len(jids), problems


def bench_gateway(
    *,
    repeat: int,
    sync: str,
    workers: int,
    redis: RedisServer,
    smtp_source: str,
    workdir: Path,
    sessions: int,
    messages: int,
    size: int,
    timeout: float,
    profile_dir: Path | None,
) -> ServerResult:
    """One run against a fresh gateway (empty journal, flushed Redis), so VmHWM is this run's peak."""
    result = ServerResult("lmtp-gateway", sessions, messages)
    result.extra["workers"] = workers
    run_dir = workdir / f"gateway-s{sessions}-r{repeat}"
    run_dir.mkdir()
    port = free_port()
    config = run_dir / "gw.yml"
    config.write_text(
        GATEWAY_CONFIG.format(
            port=port,
            workers_line=workers_line(workers),
            spool=run_dir / "spool",
            sync_line=spool_sync_line(sync),
            redis_url=redis.url,
            monitoring=monitoring_section(free_port()),
        )
    )
    log_path = run_dir / "gateway.log"
    redis.command("FLUSHALL")
    profile = profile_dir / f"gateway-s{sessions}-r{repeat}" if profile_dir else None
    env = profile_env(workdir, profile) if profile else None
    # cwd is not the repository: `python -m` (the workers) puts the cwd first on sys.path, before the snapshot.
    proc = start_process(gateway_argv(config), cwd=run_dir, output=log_path, env=env)
    run: SourceRun | None = None
    queue: QueueLength | None = None
    alive = False
    try:
        try:
            wait_ready(proc, port, log_path)
        except (RuntimeError, TimeoutError) as error:
            result.errors.append(f"gateway did not start: {str(error)[-1500:]}")
            return result
        redis_pid = redis.pid
        started = gateway_processes(proc.pid, process_tree(proc.pid), workers)
        if len(started.workers) != workers:
            result.errors.append(f"{len(started.workers)} worker processes running at the start, expected {workers}")
        result.extra["rss_start_mb_workers"] = [proc_status_mb(s.pid, "VmRSS") for s in started.workers.values()]
        queue = QueueLength(redis.host, redis.port, QUEUE_KEY)
        run = run_smtp_source(
            smtp_source,
            port=port,
            rcpt=GATEWAY_RCPT,
            messages=messages,
            sessions=sessions,
            size=size,
            timeout=timeout,
            queue=queue,
            snapshot=lambda: gateway_snapshot(proc.pid, redis_pid),
        )
        record_source(result, run, messages)
        # What the gateway still does for these messages after the last job is in Redis (an entry's move to
        # delivered/, a log line) is part of their cost: the CPU is read again once its processes are quiet.
        result.extra["cpu_settle_s"] = settle([proc.pid])
        end = gateway_snapshot(proc.pid, redis_pid)
        account_gateway(result, run, end, proc.pid, workers)
        alive = process_running(proc)
    finally:
        if queue is not None:
            queue.close()
        stop_process(proc, timeout=30)
    if not alive:
        result.errors.append("gateway died during the run")
    if proc.returncode != 0:
        result.errors.append(f"gateway exit status {proc.returncode} after SIGTERM (expected 0)")
    assert run is not None
    if run.queue_seconds is not None:
        result.seconds = run.queue_seconds
        result.msgs_per_s = messages / run.queue_seconds if run.ok else None
        result.extra["last_job_after_last_250_s"] = run.queue_seconds - run.seconds
    elif run.queue_error is not None:
        result.errors.append(run.queue_error)
    else:
        result.errors.append(
            f"{QUEUE_KEY} held {run.queue_length} of {messages} jobs "
            f"{run.done_seconds - run.seconds:.1f} s after smtp-source ended"
        )
    jobs, jids, problems = check_jobs(redis, messages)
    result.delivered = jobs
    result.extra["distinct_jids"] = jids
    result.errors.extend(problems)
    if jids != jobs:
        result.errors.append(f"{jobs - jids} jobs share a jid with another job")
    check_journal(result, run_dir / "spool", run, messages)
    problems = log_problems(log_path)
    result.extra["log_problem_lines"] = len(problems)
    if problems:
        result.errors.append("gateway log: " + " | ".join(summarize(problems)))
    if profile is not None:
        pids = result.extra.get("pids") or {}
        roles = {pid: f"worker {index}" for index, pid in enumerate(pids.get("workers", []))}
        roles[pids.get("supervisor")] = "supervisor"
        found = sorted(profile.parent.glob(f"{profile.name}-*.prof"))
        result.extra["profiles"] = {
            str(path): roles.get(int(path.stem.rpartition("-")[2]), "another process") for path in found
        }
        if not found:
            result.errors.append(f"no profile written to {profile}-*.prof")
    result.ok = run.ok and not result.errors
    return result


def account_gateway(result: ServerResult, run: SourceRun, end: dict[str, Any], root: int, workers: int) -> None:
    """CPU of the gateway's tree and of Redis, per worker, the event loops, and peak RSS per process.

    CPU per message counts from smtp-source's start until the gateway was quiet again after the last job
    (``end``); the utilisation (cores busy) is over the measured window only, to the last job in Redis.
    """
    start, done = run.snap_start, run.snap_done
    messages, window = result.messages, run.done_seconds
    if not start["tree"]:
        result.errors.append("gateway process gone before the run")
        return
    before = gateway_processes(root, start["tree"], workers)
    after = gateway_processes(root, end["tree"], workers)
    total = tree_cpu_ticks(start["tree"], end["tree"]) / TICK
    result.extra["cpu_s"] = total
    result.extra["cpu_ms_per_msg"] = total / messages * 1000
    result.extra["cpu_s_in_window"] = tree_cpu_ticks(start["tree"], done["tree"]) / TICK
    result.extra["cpu_utilization"] = result.extra["cpu_s_in_window"] / window
    redis_total = tree_cpu_ticks(start["redis"], end["redis"]) / TICK if start["redis"] else None
    redis_window = tree_cpu_ticks(start["redis"], done["redis"]) / TICK if start["redis"] else None
    result.extra["redis_cpu_s"] = redis_total
    result.extra["redis_cpu_ms_per_msg"] = None if redis_total is None else redis_total / messages * 1000
    result.extra["redis_cpu_utilization"] = None if redis_window is None else redis_window / window
    # Per process: its own time (utime + stime) over the run. What the tree used beyond the supervisor and the
    # workers that ran throughout is `cpu_s_other`: a worker that exited (in the supervisor's reaped time) or
    # one started during the run.
    supervisor_s = 0.0
    if after.supervisor is not None and before.supervisor is not None:
        supervisor_s = (after.supervisor.own - before.supervisor.own) / TICK
        result.extra["cpu_s_supervisor"] = supervisor_s
        result.extra["peak_rss_mb_supervisor"] = proc_status_mb(after.supervisor.pid, "VmHWM")
    per_worker: list[float | None] = []
    loops: list[float | None] = []
    rss: list[float | None] = []
    for index in range(workers):
        first, last = before.workers.get(index), after.workers.get(index)
        if last is None:
            result.errors.append(f"worker {index}: no process at the end of the run")
        elif first is None:
            result.errors.append(f"worker {index}: started during the run (pid {last.pid})")
        elif first.key != last.key:
            result.errors.append(f"worker {index}: pid {first.pid} was replaced by {last.pid} during the run")
        same = first is not None and last is not None and first.key == last.key
        per_worker.append((last.own - first.own) / TICK if same and first and last else None)
        thread_before = start["threads"].get(first.key) if first else None
        thread_done = done["threads"].get(first.key) if first else None
        loops.append(
            (thread_done - thread_before) / TICK / window
            if same and thread_before is not None and thread_done is not None
            else None
        )
        rss.append(proc_status_mb(last.pid, "VmHWM") if last else None)
    result.extra["cpu_s_workers"] = per_worker
    # In the kernel: system calls, the file system, loopback TCP (a send runs the receiver's side too).
    system = [
        (after.workers[i].system - before.workers[i].system) / TICK
        for i in range(workers)
        if i in before.workers and i in after.workers and before.workers[i].key == after.workers[i].key
    ]
    result.extra["cpu_system_share_workers"] = sum(system) / max(sum(v for v in per_worker if v), 1e-9)
    result.extra["cpu_s_other"] = total - supervisor_s - sum(value for value in per_worker if value is not None)
    result.extra["event_loop_utilization_workers"] = loops
    result.extra["peak_rss_mb_workers"] = rss
    known = [value for value in [*rss, result.extra.get("peak_rss_mb_supervisor")] if value is not None]
    result.extra["peak_rss_mb"] = max(known) if known else None
    result.extra["pids"] = {
        "supervisor": after.supervisor.pid if after.supervisor else None,
        "workers": [stat.pid for stat in after.workers.values()],
        "others": [f"{stat.pid} {stat.name}" for stat in after.others],
    }
    if after.others:
        result.errors.append(f"unexpected processes in the gateway's tree: {result.extra['pids']['others']}")


def check_journal(result: ServerResult, spool: Path, run: SourceRun, messages: int) -> None:
    """One entry per message over every shard, all delivered, none twice; the hand-off latencies."""
    journal = read_journal(spool)
    result.extra["journal"] = journal.counts
    result.extra["journal_shards"] = journal.per_shard
    result.extra["journal_distinct_ids"] = journal.distinct_ids
    if journal.entries != messages:
        result.errors.append(f"{journal.entries} journal entries for {messages} messages (dedupe or loss?)")
    if journal.distinct_ids != journal.entries:
        result.errors.append(f"{journal.entries - journal.distinct_ids} journal ids in more than one state or shard")
    if journal.counts["delivered"] != messages or journal.entries != journal.counts["delivered"]:
        result.errors.append(f"journal not all delivered: {journal.counts}")
    if journal.counts["quarantine"]:
        result.errors.append(f"{journal.counts['quarantine']} journal entries set aside in quarantine/")
    if journal.tmp_files:
        result.errors.append(f"{journal.tmp_files} files left in the journal's tmp/ after the stop")
    if len(journal.handoff) != journal.counts["delivered"]:
        result.errors.append(f"{journal.counts['delivered'] - len(journal.handoff)} delivered entries lack times")
    if journal.finished_at:  # the gateway's own word on when the last job was confirmed, beside the poll
        result.extra["journal_last_finished_s"] = max(journal.finished_at) - run.started_wall
    result.extra["latency_ms"] = percentiles_ms(journal.handoff)
    result.latencies = journal.handoff


# --- Dovecot -----------------------------------------------------------------------------------------------


def count_maildir(maildir: Path) -> int:
    """Messages in the INBOX: files in new/ and cur/ (Dovecot may move them to cur/ when it syncs)."""
    return sum(1 for sub in ("new", "cur") for path in (maildir / sub).iterdir() if path.is_file())


def dovecot_master(dovecot: DovecotServer) -> int:
    """The master's pid: the process started (``dovecot -F``), which writes the same to base_dir/master.pid."""
    pid = dovecot.pid
    if pid is None:
        raise RuntimeError("dovecot is not running")
    written = dovecot.tmpdir / "run" / "master.pid"
    if written.exists() and written.read_text().strip() != str(pid):
        raise RuntimeError(f"dovecot: {written} says {written.read_text().strip()}, the process started is {pid}")
    return pid


def bench_dovecot(*, smtp_source: str, sessions: int, messages: int, size: int, timeout: float) -> ServerResult:
    """One run against a fresh Dovecot, so every run starts with an empty Maildir and index."""
    result = ServerResult("dovecot", sessions, messages)
    run: SourceRun | None = None
    dovecot = DovecotServer()
    try:
        dovecot.start()
        master = dovecot_master(dovecot)
        run = run_smtp_source(
            smtp_source,
            port=dovecot.lmtp_port,
            rcpt=DOVECOT_RCPT,
            messages=messages,
            sessions=sessions,
            size=size,
            timeout=timeout,
            snapshot=lambda: process_tree(master),
        )
        record_source(result, run, messages)
        result.seconds = run.seconds
        if run.ok:
            result.msgs_per_s = messages / run.seconds
        result.extra["cpu_settle_s"] = settle([master])
        end = process_tree(master)
        if not end:
            result.errors.append("dovecot's master died during the run")
        total = tree_cpu_ticks(run.snap_start, end) / TICK
        result.extra["cpu_s"] = total
        result.extra["cpu_ms_per_msg"] = total / messages * 1000
        result.extra["cpu_s_in_window"] = tree_cpu_ticks(run.snap_start, run.snap_done) / TICK
        result.extra["cpu_utilization"] = result.extra["cpu_s_in_window"] / run.done_seconds
        result.extra["processes"] = sorted({stat.name for stat in end.values()})
        result.extra["process_count"] = len(end)
        result.delivered = count_maildir(dovecot.maildir())
        problems = [
            line
            for line in dovecot.log_path.read_text(errors="replace").splitlines()
            if "Error:" in line or "Warning:" in line or "Fatal:" in line or "Panic:" in line
        ]
        if problems:
            result.errors.append("dovecot log: " + " | ".join(summarize(problems)))
    except (RuntimeError, TimeoutError) as error:
        result.errors.append(f"dovecot: {str(error)[-1500:]}")
    finally:
        dovecot.stop(graceful=False)  # throw-away: skip the 1 s orderly shutdown
    if result.delivered != messages:
        result.errors.append(f"{result.delivered} files in the Maildir, expected {messages}")
    result.ok = run is not None and run.ok and not result.errors
    return result


# --- report ------------------------------------------------------------------------------------------------


def rss_list(values: list[float | None]) -> str:
    return " ".join(fmt(value, ".1f") for value in values) or "-"


def table(rows: list[dict[str, Any]]) -> str:
    """The comparison, one line per session count (medians over the repeats)."""
    header = (
        f"{'sessions':>8}  {'gateway msg/s':>13}  {'dovecot msg/s':>13}  {'ratio':>5}  "
        f"{'gw CPU ms/msg':>13}  {'dc CPU ms/msg':>13}  {'p50 ms':>6}  {'p90':>6}  {'p99':>6}  "
        f"{'peak RSS MB per worker':<22}  {'checks':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        gw, dc = row["gateway"], row["dovecot"]
        latency = gw["latency_ms"]
        checks = "ok" if gw["ok"] and dc["ok"] else "FAIL"
        lines.append(
            f"{row['sessions']:>8}  {fmt(gw['msgs_per_s']):>13}  {fmt(dc['msgs_per_s']):>13}  "
            f"{fmt(row['ratio'], '.2f'):>5}  {fmt(gw['cpu_ms_per_msg'], '.2f'):>13}  "
            f"{fmt(dc['cpu_ms_per_msg'], '.2f'):>13}  {fmt(latency['p50'], '.1f'):>6}  "
            f"{fmt(latency['p90'], '.1f'):>6}  {fmt(latency['p99'], '.1f'):>6}  "
            f"{rss_list(gw['peak_rss_mb_workers']):<22}  {checks:>6}"
        )
    return "\n".join(lines)


def worst_per_index(runs: list[list[float | None]]) -> list[float | None]:
    """Per worker, the largest figure over the runs (None where a run lacks it)."""
    width = max((len(values) for values in runs), default=0)
    worst: list[float | None] = []
    for index in range(width):
        seen = [values[index] if index < len(values) else None for values in runs]
        worst.append(None if any(v is None for v in seen) else max(v for v in seen if v is not None))
    return worst


def summarize_sessions(sessions: int, gateway: list[ServerResult], dovecot: list[ServerResult]) -> dict[str, Any]:
    """One row: medians per server, latency pooled over all gateway repeats, worst-case RSS per worker."""

    def med(results: list[ServerResult], key: str) -> float | None:
        return median([r.extra.get(key) for r in results])

    gw_rates = [r.msgs_per_s for r in gateway]
    dc_rates = [r.msgs_per_s for r in dovecot]
    gw_250 = [r.extra.get("msgs_per_s_at_last_250") for r in gateway]
    gw_median, dc_median, gw_250_median = median(gw_rates), median(dc_rates), median(gw_250)
    supervisor = [r.extra.get("peak_rss_mb_supervisor") for r in gateway]
    return {
        "sessions": sessions,
        "ratio": gw_median / dc_median if gw_median and dc_median else None,
        "ratio_at_last_250": gw_250_median / dc_median if gw_250_median and dc_median else None,
        "gateway": {
            "msgs_per_s": gw_median,
            "msgs_per_s_runs": gw_rates,
            "msgs_per_s_at_last_250": gw_250_median,
            "msgs_per_s_at_last_250_runs": gw_250,
            "last_job_after_last_250_s": med(gateway, "last_job_after_last_250_s"),
            "cpu_ms_per_msg": med(gateway, "cpu_ms_per_msg"),
            "cpu_utilization": med(gateway, "cpu_utilization"),
            "redis_cpu_ms_per_msg": med(gateway, "redis_cpu_ms_per_msg"),
            "redis_cpu_utilization": med(gateway, "redis_cpu_utilization"),
            "machine_busy_cores": med(gateway, "machine_busy_cores"),
            "latency_ms": percentiles_ms([x for r in gateway for x in r.latencies]),
            "peak_rss_mb_workers": worst_per_index([r.extra.get("peak_rss_mb_workers") or [] for r in gateway]),
            "peak_rss_mb_supervisor": None if None in supervisor else max(supervisor, default=None),
            "ok": all(r.ok for r in gateway),
        },
        "dovecot": {
            "msgs_per_s": dc_median,
            "msgs_per_s_runs": dc_rates,
            "cpu_ms_per_msg": med(dovecot, "cpu_ms_per_msg"),
            "cpu_utilization": med(dovecot, "cpu_utilization"),
            "machine_busy_cores": med(dovecot, "machine_busy_cores"),
            "ok": all(r.ok for r in dovecot),
        },
        "runs": [r.as_json() for pair in zip(gateway, dovecot, strict=True) for r in pair],
    }


def describe(row: dict[str, Any]) -> str:
    """The figures behind one row of the table, for the lines under it."""
    gw, dc = row["gateway"], row["dovecot"]
    gw_runs = [r for r in row["runs"] if r["server"] == "lmtp-gateway"]

    def runs(values: list[float | None]) -> str:
        return "[" + ", ".join(fmt(v) for v in values) + "]"

    def per_run(key: str, spec: str) -> str:
        return "; ".join("[" + ", ".join(fmt(v, spec) for v in (r["extra"].get(key) or [])) + "]" for r in gw_runs)

    def delivered_per_shard(run: dict[str, Any]) -> str:
        return " ".join(f"{name}={n.get('delivered', 0)}" for name, n in run["extra"].get("journal_shards", {}).items())

    shards = "; ".join(delivered_per_shard(r) for r in gw_runs)
    latency = gw["latency_ms"]
    return "\n".join(
        [
            f"  sessions={row['sessions']}: gateway msg/s per run {runs(gw['msgs_per_s_runs'])} (last job in Redis), "
            f"{runs(gw['msgs_per_s_at_last_250_runs'])} at the last 250 (median {fmt(gw['msgs_per_s_at_last_250'])}, "
            f"ratio {fmt(row['ratio_at_last_250'], '.2f')}); the last job was in Redis "
            f"{fmt(gw['last_job_after_last_250_s'], '.3f')} s after smtp-source ended (median); "
            f"dovecot {runs(dc['msgs_per_s_runs'])}",
            f"    CPU: gateway {fmt(gw['cpu_ms_per_msg'], '.2f')} ms/msg, {fmt(gw['cpu_utilization'], '.2f')} cores "
            f"busy (per worker s {per_run('cpu_s_workers', '.2f')}; "
            f"event loops {per_run('event_loop_utilization_workers', '.2f')} cores; in the kernel "
            f"{'/'.join(fmt(r['extra'].get('cpu_system_share_workers'), '.0%') for r in gw_runs)}); "
            f"redis {fmt(gw['redis_cpu_ms_per_msg'], '.2f')} ms/msg, {fmt(gw['redis_cpu_utilization'], '.2f')} cores; "
            f"dovecot {fmt(dc['cpu_ms_per_msg'], '.2f')} ms/msg, {fmt(dc['cpu_utilization'], '.2f')} cores; "
            f"the whole machine kept {fmt(gw['machine_busy_cores'], '.2f')} of {os.cpu_count()} cores busy under "
            f"the gateway, {fmt(dc['machine_busy_cores'], '.2f')} under Dovecot",
            f"    hand-off p50 {fmt(latency['p50'], '.1f')} p90 {fmt(latency['p90'], '.1f')} "
            f"p99 {fmt(latency['p99'], '.1f')} max {fmt(latency['max'], '.1f')} ms; delivered per shard {shards}; "
            f"peak RSS MB supervisor {fmt(gw['peak_rss_mb_supervisor'], '.1f')}, "
            f"workers {rss_list(gw['peak_rss_mb_workers'])}",
        ]
    )


def print_profiles(paths: dict[str, str], top: int = 25) -> None:
    """The hotspots of each profiled gateway process (path: which process), by own and by cumulative time."""
    import pstats

    for path, role in paths.items():
        if not Path(path).exists():
            print(f"(no profile written to {path})")
            continue
        print(f"\n=== {path} ({role}) ===")
        stats = pstats.Stats(str(path))
        stats.strip_dirs().sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000, help="messages per run (default 5000)")
    parser.add_argument("--sessions", default="1,16", help="comma-separated session counts (default 1,16)")
    parser.add_argument("--size", type=int, default=10240, help="message payload in bytes (default 10240)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per server and session count (default 3)")
    parser.add_argument(
        "--workers", type=int, default=2, help="the gateway's lmtp.workers: worker processes (default 2)"
    )
    parser.add_argument(
        "--sync",
        default="fsync",
        choices=("fsync", "syncfs", "off"),
        help="the gateway's spool durability (default fsync; syncfs needs a newer gateway)",
    )
    parser.add_argument(
        "--ref", metavar="COMMIT", help="measure the gateway as of this git commit (default: the working tree)"
    )
    parser.add_argument("--timeout", type=float, default=300, help="limit per smtp-source run in s (default 300)")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_RESULTS, help="JSON results (default: next to this script)"
    )
    parser.add_argument("--scratch", choices=CHOICES, default="auto", help=SCRATCH_HELP)
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="run every gateway process under cProfile, .prof files here"
    )
    args = parser.parse_args(argv)
    try:
        args.session_counts = [int(s) for s in args.sessions.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sessions: not a comma-separated list of numbers: {args.sessions!r}")
    if min(args.messages, args.size, args.repeat, args.workers, *args.session_counts, len(args.session_counts)) < 1:
        parser.error("--messages, --size, --repeat, --workers and every session count must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return measure_on_scratch(args.scratch, lambda scratch: measure(args, scratch))


def measure(args: argparse.Namespace, scratch: str) -> int:
    smtp_source = require_binary("smtp-source", "postfix")
    profile_dir: Path | None = args.profile.resolve() if args.profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="lmtp-bench-"))
    redis = RedisServer()
    try:
        code = {**git_state(args.ref), "source_sha256": code_digest(snapshot_code(workdir, args.ref))}
        # Fail now, not after the first run, if this gateway cannot do what is asked.
        spool_sync_line(args.sync)
        workers_line(args.workers)
        load_before = load_at_start()
        create_before = file_create_us(Path(tempfile.gettempdir()))
        redis.start()
        for sessions in args.session_counts:
            gateway: list[ServerResult] = []
            dovecot: list[ServerResult] = []
            for repeat in range(args.repeat):
                # Alternate who goes first, so a slow drift of the machine's load hits both servers alike.
                order = ("gateway", "dovecot") if repeat % 2 == 0 else ("dovecot", "gateway")
                for server in order:
                    print(f"sessions={sessions} run {repeat + 1}/{args.repeat}: {server} ...", file=sys.stderr)
                    if server == "gateway":
                        gateway.append(
                            bench_gateway(
                                repeat=repeat,
                                sync=args.sync,
                                workers=args.workers,
                                redis=redis,
                                smtp_source=smtp_source,
                                workdir=workdir,
                                sessions=sessions,
                                messages=args.messages,
                                size=args.size,
                                timeout=args.timeout,
                                profile_dir=profile_dir,
                            )
                        )
                    else:
                        dovecot.append(
                            bench_dovecot(
                                smtp_source=smtp_source,
                                sessions=sessions,
                                messages=args.messages,
                                size=args.size,
                                timeout=args.timeout,
                            )
                        )
            rows.append(summarize_sessions(sessions, gateway, dovecot))
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    create_after = file_create_us(Path(tempfile.gettempdir()))
    if args.ref is None:
        code["working_tree_changed_during_run"] = code_digest(REPO) != code["source_sha256"]
    results = {
        "benchmark": "lmtp",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "params": {
            "messages": args.messages,
            "sessions": args.session_counts,
            "size": args.size,
            "repeat": args.repeat,
            "workers": args.workers,
            "spool_sync": args.sync,
            "profiled": profile_dir is not None,
            "queue_poll_s": QUEUE_POLL_S,
            "clock_ticks_per_s": TICK,
        },
        "gateway_code": code,
        "machine": {
            **machine(),
            "tmpdir": tempfile.gettempdir(),
            "scratch": scratch,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "file_create_us_before": create_before,
            "file_create_us_after": create_after,
        },
        "results": rows,
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\n{args.messages} messages of {args.size} bytes per run, gateway with {args.workers} worker(s), median of "
        f"{args.repeat} run(s); gateway msg/s when the last job was in Redis, Dovecot's when smtp-source was done; "
        "ratio = gateway / dovecot" + (" (gateway under cProfile: numbers not representative)" if profile_dir else "")
    )
    print(table(rows))
    print()
    for row in rows:
        print(describe(row))
    print(
        f"  load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); "
        f"creating a file in {tempfile.gettempdir()}: {create_before:.0f} us before, {create_after:.0f} us after"
    )
    anomalies = [
        f"{run['server']} sessions={row['sessions']}: {error}"
        for row in rows
        for run in row["runs"]
        for error in run["errors"]
    ]
    changed = " (the working tree changed during the run; the snapshot was measured)"
    changed = changed if code.get("working_tree_changed_during_run") else ""
    print(
        f"  gateway code: snapshot {code['source_sha256']} of commit {code.get('commit', '?')}"
        + (f" + uncommitted {', '.join(code['uncommitted'])}" if code.get("uncommitted") else "")
        + changed
    )
    print("\nanomalies:" if anomalies else "\nno anomalies: every message accounted for, logs clean")
    for line in anomalies:
        print(f"  - {line}")
    print(f"\nresults written to {args.output}")
    if profile_dir:
        print_profiles(
            {
                path: role
                for row in rows
                for run in row["runs"]
                for path, role in run["extra"].get("profiles", {}).items()
            }
        )
    return 0 if all(row["gateway"]["ok"] and row["dovecot"]["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
