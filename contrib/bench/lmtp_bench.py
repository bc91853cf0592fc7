"""LMTP throughput benchmark: lmtp-gateway (Sidekiq sink, fsync on) against Dovecot LMTP (Maildir).

Both servers get the same load from Postfix's ``smtp-source`` (LMTP, connection reuse, N messages of SIZE
bytes over S parallel sessions), so the gateway's numbers can be read against a well-known, native LMTP
server on the same machine: Dovecot is the anchor, the ratio is what matters.

Every run starts from a clean slate (a fresh gateway with an empty journal and an empty Redis, a fresh
Dovecot with an empty Maildir) and is checked afterwards: one Sidekiq job per message in ``queue:default``
(each an ``EmailReceiverWorker`` with its own jid) and one journal entry per message, or one Maildir file per
message for Dovecot. A throughput figure for mail that did not arrive would be worthless.

Run from the repository root::

    .venv/bin/python contrib/bench/lmtp_bench.py [--messages 5000] [--sessions 1,16] [--size 10240]

Each configuration runs ``--repeat`` times (default 3, alternating which server goes first) and the median is
reported. The gateway code is snapshotted at the start (``--ref COMMIT`` takes it from git instead), so edits
made while the benchmark runs do not leak into it. ``--profile DIR`` runs the gateway under cProfile (slower:
use it to find hotspots, not for the numbers; it sees the event-loop thread only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Beside this file; importing common first also puts the repository root on sys.path, for tests.servers.
from common import (
    GATEWAY_RCPT,
    QUEUE_KEY,
    REPO,
    WORKER,
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
    queued_jobs,
    snapshot_code,
    summarize,
)
from scratch import CHOICES, measure_on_scratch
from scratch import HELP as SCRATCH_HELP

from tests.servers import free_port, process_running, require_binary, start_process, stop_process, wait_until
from tests.servers.dovecot import DovecotServer
from tests.servers.redis import RedisServer

DOVECOT_RCPT = "gitlab@localhost"
SENDER = "bench@localhost"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results-lmtp.json"

GATEWAY_CONFIG = """\
gitlab:
  host: localhost
incoming_email:
  address: "incoming+%{{key}}@localhost"
  delivery_method: sidekiq
lmtp:
  listen: "127.0.0.1:{port}"
  max_message_size: 25M
spool:
  path: {spool}
  {sync_line}
redis:
  url: {redis_url}
"""


def spool_sync_line(method: str) -> str:
    """The spool's durability setting in the syntax of the gateway being measured.

    Older gateways take ``fsync: true|false``, newer ones ``sync: fsync|syncfs|off``; the schema of the code
    being measured (the snapshot, first on sys.path) says which, so the benchmark works across versions and
    never measures a configuration the gateway would reject.
    """
    from lmtp_gateway.config import SCHEMA

    keys = SCHEMA.get("spool", {})
    if "sync" in keys:
        return f"sync: {method}"
    if "fsync" in keys and method in ("fsync", "off"):
        return f"fsync: {'true' if method == 'fsync' else 'false'}"
    raise SystemExit(f"--sync {method}: not supported by this gateway (spool keys: {', '.join(keys)})")


@dataclass
class SourceRun:
    """One smtp-source invocation: how long it took and whether it finished cleanly."""

    seconds: float
    exit_code: int | None  # None: killed after the time limit
    stderr: str
    machine_busy_cores: float | None = None  # every process and the kernel, during the run

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class ServerResult:
    """What one server did with one load: speed, and the proof that every message arrived."""

    server: str
    sessions: int
    messages: int
    seconds: float | None = None
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


# --- helpers -----------------------------------------------------------------------------------------------


def run_smtp_source(
    binary: str, *, port: int, rcpt: str, messages: int, sessions: int, size: int, timeout: float
) -> SourceRun:
    """Time one smtp-source run; kill it (and say so) if it outlives ``timeout``.

    ``-d`` keeps each session's connection open for all its messages, as Postfix's LMTP client does with
    connection caching; without ``-A`` any unexpected reply (a 4xx deferral, a 5xx) aborts with a non-zero
    exit, so a clean exit means every message got its 250.
    """
    argv = [
        binary,
        "-L",
        "-d",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        SENDER,
        "-t",
        rcpt,
        f"127.0.0.1:{port}",
    ]
    started, busy_before = time.perf_counter(), cpu_times()["busy"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
        exit_code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        exit_code = None
    seconds = time.perf_counter() - started
    busy = (cpu_times()["busy"] - busy_before) / os.sysconf("SC_CLK_TCK")
    text = (out + err).decode(errors="replace").strip()
    return SourceRun(seconds, exit_code, text, busy / seconds)


def cpu_seconds(pid: int, tid: int | None = None) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a process (all its threads), or of one of its threads, from /proc.

    Compared with the wall time they tell whether the gateway was CPU-bound (about 1.0: one core busy) or
    waiting (for the disk, for the client), and whether the time goes to Python (user) or to the kernel
    (system: file creation, fsync, sockets). The main thread (tid = pid) runs the event loop; the others are
    the journal's writer/sync thread and asyncio's to_thread pool.
    """
    stat = Path(f"/proc/{pid}/stat") if tid is None else Path(f"/proc/{pid}/task/{tid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


def proc_status_mb(pid: int, key: str) -> float | None:
    """A memory figure (``VmHWM``: peak resident set, ``VmRSS``: current) from /proc, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


# --- the gateway -------------------------------------------------------------------------------------------


def gateway_argv(config: Path, profile: Path | None) -> list[str]:
    """The installed console script, or the same module under cProfile (``--profile``)."""
    bindir = REPO / ".venv" / "bin"
    if profile is not None:
        python = bindir / "python" if (bindir / "python").exists() else Path(sys.executable)
        prefix = [str(python), "-m", "cProfile", "-o", str(profile), "-m", "lmtp_gateway"]
    else:
        prefix = [gateway_script()]
    return [*prefix, "serve", "--config", str(config), "--log-level", "warning"]


def read_journal(spool: Path) -> tuple[dict[str, int], list[float], list[float]]:
    """Entries per journal state, and two latencies of the delivered ones.

    Hand-off (finished_at - received_at): received_at is taken before the journal commit, finished_at when the
    Sidekiq push was confirmed, so it covers fsync, the dispatcher's queue and the Redis round trip: what a
    message waits between Postfix handing it over and GitLab being able to see it. After the 250
    (finished_at - extra.submitted_at): from the moment the entry was committed and handed to the dispatcher.
    """
    counts: dict[str, int] = {}
    latencies: list[float] = []
    after_ack: list[float] = []
    for state in ("pending", "delivered", "dropped", "failed"):
        files = list((spool / state).glob("*.json"))
        counts[state] = len(files)
        if state != "delivered":
            continue
        for path in files:
            meta = json.loads(path.read_bytes())
            if meta.get("finished_at") is not None and meta.get("received_at") is not None:
                latencies.append(meta["finished_at"] - meta["received_at"])
            submitted = (meta.get("extra") or {}).get("submitted_at")
            if meta.get("finished_at") is not None and submitted is not None:
                after_ack.append(meta["finished_at"] - submitted)
    return counts, latencies, after_ack


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
    run_dir = workdir / f"gateway-s{sessions}-r{repeat}"
    run_dir.mkdir()
    port = free_port()
    config = run_dir / "gw.yml"
    config.write_text(
        GATEWAY_CONFIG.format(port=port, spool=run_dir / "spool", redis_url=redis.url, sync_line=spool_sync_line(sync))
    )
    log_path = run_dir / "gateway.log"
    redis.command("FLUSHALL")
    profile = profile_dir / f"gateway-s{sessions}-r{repeat}.prof" if profile_dir else None
    # cwd is not the repository: `python -m` (cProfile) puts the cwd first on sys.path, before the snapshot.
    proc = start_process(gateway_argv(config, profile), cwd=run_dir, output=log_path)
    try:
        wait_until(lambda: greets(port), timeout=30, what="lmtp-gateway", proc=proc, log_files=[log_path])
        result.extra["rss_start_mb"] = proc_status_mb(proc.pid, "VmRSS")
        cpu_before, main_before, started = cpu_seconds(proc.pid), cpu_seconds(proc.pid, proc.pid), time.perf_counter()
        run = run_smtp_source(
            smtp_source, port=port, rcpt=GATEWAY_RCPT, messages=messages, sessions=sessions, size=size, timeout=timeout
        )
        accepted_at = time.perf_counter()
        record_source(result, run, messages)
        # The 250 comes after the journal commit; the Sidekiq push follows. Wait for the queue to fill, so
        # the latencies and the counts below are complete (and measure how far delivery lags behind).
        with contextlib.suppress(TimeoutError, RuntimeError):
            wait_until(
                lambda: redis.command("LLEN", QUEUE_KEY) == messages,
                timeout=120,
                what="Redis queue",
                proc=proc,
                interval=0.05,
            )
        result.extra["drain_after_last_250_s"] = time.perf_counter() - accepted_at
        result.extra["peak_rss_mb"] = proc_status_mb(proc.pid, "VmHWM")
        cpu_after, main_after = cpu_seconds(proc.pid), cpu_seconds(proc.pid, proc.pid)
        if cpu_before and cpu_after and main_before and main_after:
            user, system = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
            busy = user + system
            result.extra["cpu_s"] = busy
            result.extra["cpu_user_s"] = user
            result.extra["cpu_system_s"] = system
            result.extra["cpu_main_thread_user_s"] = main_after[0] - main_before[0]
            result.extra["cpu_main_thread_system_s"] = main_after[1] - main_before[1]
            wall = time.perf_counter() - started
            result.extra["cpu_ms_per_msg"] = busy / messages * 1000
            result.extra["cpu_utilization"] = busy / wall
            result.extra["cpu_main_thread_utilization"] = (sum(main_after) - sum(main_before)) / wall
        alive = process_running(proc)
    finally:
        stop_process(proc, timeout=30)
    if not alive:
        result.errors.append("gateway died during the run")
    if proc.returncode != 0:
        result.errors.append(f"gateway exit status {proc.returncode} after SIGTERM (expected 0)")
    jobs, jids, problems = check_jobs(redis, messages)
    result.delivered = jobs
    result.extra["distinct_jids"] = jids
    result.errors.extend(problems)
    if jids != jobs:
        result.errors.append(f"{jobs - jids} jobs share a jid with another job")
    counts, latencies, after_ack = read_journal(run_dir / "spool")
    result.extra["after_250_ms"] = percentiles_ms(after_ack)
    result.extra["journal"] = counts
    entries = sum(counts.values())
    if entries != messages:
        result.errors.append(f"{entries} journal entries for {messages} messages (dedupe or loss?)")
    if counts["pending"] or counts["failed"] or counts["dropped"]:
        result.errors.append(f"journal not all delivered: {counts}")
    result.extra["latency_ms"] = percentiles_ms(latencies)
    result.latencies = latencies
    problems = log_problems(log_path)
    result.extra["log_problem_lines"] = len(problems)
    if problems:
        result.errors.append("gateway log: " + " | ".join(summarize(problems)))
    if profile is not None:
        result.extra["profile"] = str(profile)
    result.ok = run.ok and not result.errors
    return result


def record_source(result: ServerResult, run: SourceRun, messages: int) -> None:
    """Throughput from the smtp-source run, and its failure (exit code, output) if any."""
    result.seconds = run.seconds
    result.extra["machine_busy_cores"] = run.machine_busy_cores
    if run.ok:
        result.msgs_per_s = messages / run.seconds
    elif run.exit_code is None:
        result.errors.append(f"smtp-source killed after {run.seconds:.0f}s: {run.stderr[-500:]}")
    else:
        result.errors.append(f"smtp-source exit {run.exit_code}: {run.stderr[-500:]}")
    if run.ok and run.stderr:
        result.errors.append(f"smtp-source said: {run.stderr[-500:]}")


# --- Dovecot -----------------------------------------------------------------------------------------------


def count_maildir(maildir: Path) -> int:
    """Messages in the INBOX: files in new/ and cur/ (Dovecot may move them to cur/ when it syncs)."""
    return sum(1 for sub in ("new", "cur") for path in (maildir / sub).iterdir() if path.is_file())


def bench_dovecot(*, smtp_source: str, sessions: int, messages: int, size: int, timeout: float) -> ServerResult:
    """One run against a fresh Dovecot, so every run starts with an empty Maildir and index."""
    result = ServerResult("dovecot", sessions, messages)
    run: SourceRun | None = None
    dovecot = DovecotServer()
    try:
        dovecot.start()
        run = run_smtp_source(
            smtp_source,
            port=dovecot.lmtp_port,
            rcpt=DOVECOT_RCPT,
            messages=messages,
            sessions=sessions,
            size=size,
            timeout=timeout,
        )
        record_source(result, run, messages)
        result.delivered = count_maildir(dovecot.maildir())
        problems = [
            line
            for line in dovecot.log_path.read_text(errors="replace").splitlines()
            if "Error:" in line or "Warning:" in line or "Fatal:" in line or "Panic:" in line
        ]
        if problems:
            result.errors.append("dovecot log: " + " | ".join(summarize(problems)))
    finally:
        dovecot.stop(graceful=False)  # throw-away: skip the 1 s orderly shutdown
    if result.delivered != messages:
        result.errors.append(f"{result.delivered} files in the Maildir, expected {messages}")
    result.ok = run is not None and run.ok and not result.errors
    return result


# --- report ------------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    """The comparison, one line per session count (medians over the repeats)."""
    header = (
        f"{'sessions':>8}  {'gateway msg/s':>13}  {'dovecot msg/s':>13}  {'ratio':>5}  "
        f"{'gw p50 ms':>9}  {'p90':>6}  {'p99':>6}  {'gw peak RSS MB':>14}  {'checks':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        gw, dc = row["gateway"], row["dovecot"]
        latency = gw["latency_ms"]
        checks = "ok" if gw["ok"] and dc["ok"] else "FAIL"
        lines.append(
            f"{row['sessions']:>8}  {fmt(gw['msgs_per_s']):>13}  {fmt(dc['msgs_per_s']):>13}  "
            f"{fmt(row['ratio'], '.2f'):>5}  {fmt(latency['p50'], '.1f'):>9}  {fmt(latency['p90'], '.1f'):>6}  "
            f"{fmt(latency['p99'], '.1f'):>6}  {fmt(gw['peak_rss_mb'], '.1f'):>14}  {checks:>6}"
        )
    return "\n".join(lines)


def summarize_sessions(sessions: int, gateway: list[ServerResult], dovecot: list[ServerResult]) -> dict[str, Any]:
    """One row: median throughput per server, latency pooled over all gateway repeats, worst-case RSS."""
    gw_rates = [r.msgs_per_s for r in gateway]
    dc_rates = [r.msgs_per_s for r in dovecot]
    gw_median, dc_median = median(gw_rates), median(dc_rates)
    rss = [r.extra["peak_rss_mb"] for r in gateway if r.extra.get("peak_rss_mb") is not None]
    return {
        "sessions": sessions,
        "ratio": gw_median / dc_median if gw_median and dc_median else None,
        "gateway": {
            "msgs_per_s": gw_median,
            "msgs_per_s_runs": gw_rates,
            "latency_ms": percentiles_ms([x for r in gateway for x in r.latencies]),
            "peak_rss_mb": max(rss) if rss else None,
            "ok": all(r.ok for r in gateway),
        },
        "dovecot": {"msgs_per_s": dc_median, "msgs_per_s_runs": dc_rates, "ok": all(r.ok for r in dovecot)},
        "runs": [r.as_json() for pair in zip(gateway, dovecot, strict=True) for r in pair],
    }


def print_profiles(paths: list[Path], top: int = 25) -> None:
    """The hotspots of each profiled gateway run, by own time and by cumulative time."""
    import pstats

    for path in paths:
        if not path.exists():
            print(f"(no profile written to {path})")
            continue
        print(f"\n=== {path} ===")
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
    parser.add_argument("--profile", type=Path, metavar="DIR", help="run the gateway under cProfile, .prof files here")
    args = parser.parse_args(argv)
    try:
        args.session_counts = [int(s) for s in args.sessions.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sessions: not a comma-separated list of numbers: {args.sessions!r}")
    if min(args.messages, args.size, args.repeat, *args.session_counts, 0 if not args.session_counts else 1) < 1:
        parser.error("--messages, --size, --repeat and every session count must be positive")
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
        spool_sync_line(args.sync)  # fail now, not after the first run, if this gateway cannot do it
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
            "spool_sync": args.sync,
            "profiled": profile_dir is not None,
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
        f"\n{args.messages} messages of {args.size} bytes per run, median of {args.repeat} run(s); "
        "ratio = gateway / dovecot" + (" (gateway under cProfile: numbers not representative)" if profile_dir else "")
    )
    print(table(rows))
    print()
    for row in rows:
        rates = " ".join(
            f"{name}=[{', '.join(fmt(v) for v in row[name]['msgs_per_s_runs'])}]" for name in ("gateway", "dovecot")
        )
        gw_runs = [r for r in row["runs"] if r["server"] == "lmtp-gateway"]
        drain = max((r["extra"].get("drain_after_last_250_s") or 0.0) for r in gw_runs)
        cpu = median([r["extra"].get("cpu_ms_per_msg") for r in gw_runs])
        busy = median([r["extra"].get("cpu_utilization") for r in gw_runs])
        loop = median([r["extra"].get("cpu_main_thread_utilization") for r in gw_runs])
        after = median([(r["extra"].get("after_250_ms") or {}).get("p50") for r in gw_runs])
        machine_busy = {
            server: median([r["extra"].get("machine_busy_cores") for r in row["runs"] if r["server"] == server])
            for server in ("lmtp-gateway", "dovecot")
        }
        print(
            f"  sessions={row['sessions']}: msg/s per run {rates}; after the 250 to Redis p50 {fmt(after, '.2f')} ms; "
            f"gateway latency max "
            f"{fmt(row['gateway']['latency_ms']['max'], '.1f')} ms, Redis drain after the last 250 <= {drain:.2f} s, "
            f"CPU {fmt(cpu, '.2f')} ms/msg, {fmt(busy, '.2f')} cores busy (event-loop thread {fmt(loop, '.2f')}); "
            f"the whole machine kept {fmt(machine_busy['lmtp-gateway'], '.2f')} of {os.cpu_count()} cores busy "
            f"under the gateway, {fmt(machine_busy['dovecot'], '.2f')} under Dovecot"
        )
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
            [Path(run["extra"]["profile"]) for row in rows for run in row["runs"] if "profile" in run["extra"]]
        )
    return 0 if all(row["gateway"]["ok"] and row["dovecot"]["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
