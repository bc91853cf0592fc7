"""Collector benchmark: ``lmtp-gateway collect`` against GitLab's mail_room, on one Dovecot and one Redis.

Two questions from issue #5, both answered side by side with mail_room (Debian's ``ruby-mail-room``, configured
the way GitLab's ``config/mail_room.yml`` renders it: Sidekiq delivery into ``queue:default``, Redis arbitration
under ``mail_room:gitlab``, ``delete_after_delivery: true``, ``idle_timeout: 60``):

1. **Backlog drain rate**: N distinct messages are delivered into a fresh Dovecot mailbox over LMTP first; then
   the collector is started and the clock runs from its start until N Sidekiq jobs are in Redis (``LLEN
   queue:default`` polled every 5 ms). lmtp-gateway runs twice: ``collect --once`` and the daemon.
2. **Idle-to-Redis latency**: the collector is idle in IMAP IDLE on an empty mailbox (seen from the server side:
   Dovecot's process title says ``IDLE``); one message is delivered over LMTP, and the clock runs from the LMTP
   ``250`` to the ``LPUSH`` on ``queue:default`` (a Redis keyspace notification). Dovecot delays IDLE pushes by a
   hard-coded 500 ms, so the same is measured for a bare IMAP IDLE client: that is the floor both collectors sit
   on, and what each adds on top of it is the collector's own share.

Peak RSS and CPU of each collector process come from ``wait4`` (``ru_maxrss``, ``ru_utime + ru_stime``).

Run from the repository root::

    .venv/bin/python contrib/bench/collect_bench.py            # 2000 messages, 3 repeats, 7 latency samples each
    .venv/bin/python contrib/bench/collect_bench.py --quick    # ~1 minute

Every run is checked (N jobs, each an ``EmailReceiverWorker``, each message exactly once, every message flagged
``\\Deleted`` on the server, no warnings in the collector's log). The exit status is 0 only if every check
passed; whether the targets (drain rate >= mail_room's, latency <= 1/5 of mail_room's) were met is printed and
saved, not turned into the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

# Beside this file; importing common first also puts the repository root on sys.path, for tests.servers.
from common import (
    GATEWAY_RCPT,
    QUEUE_KEY,
    WORKER,
    code_digest,
    file_create_us,
    fmt,
    gateway_script,
    git_state,
    load_at_start,
    log_problems,
    machine,
    median,
    percentiles_ms,
    snapshot_code,
    summarize,
)
from scratch import CHOICES, measure_on_scratch
from scratch import HELP as SCRATCH_HELP

from tests.mailbox import Inspector
from tests.servers import process_running, require_binary, start_process, stop_process
from tests.servers.dovecot import DovecotServer
from tests.servers.redis import RedisServer

ARBITRATION_NAMESPACE = "mail_room:gitlab"  # Gitlab::Redis::Queues::MAILROOM_NAMESPACE
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results-collect.json"
DRAIN_LEGS = ("mail_room", "gateway-once", "gateway-daemon")
LATENCY_LEGS = ("dovecot-idle", "mail_room", "gateway-daemon")
LABELS = {
    "mail_room": "mail_room (sidekiq)",
    "gateway-once": "lmtp-gateway collect --once",
    "gateway-daemon": "lmtp-gateway collect",
    "dovecot-idle": "bare IMAP IDLE client",
}
POLL_S = 0.005

# GitLab's config/mail_room.yml, rendered for one incoming_email mailbox with GitLab's defaults
# (lib/gitlab/mail_room.rb: port 143, ssl/start_tls false, mailbox inbox, idle_timeout 60, expunge_deleted false,
# delete_after_delivery true, delivery_method sidekiq, queue default, worker EmailReceiverWorker).
# `:redis_db:` is rendered by GitLab; this mail_room version ignores it (db 0 from the URL either way).
MAIL_ROOM_CONFIG = """\
:mailboxes:
  -
    :host: "{host}"
    :port: {port}
    :ssl: false
    :start_tls: false
    :email: "{user}"
    :password: "{password}"
    :idle_timeout: 60
    :logger:
      :log_path: "{log_path}"
    :name: "inbox"
    :delete_after_delivery: true
    :expunge_deleted: false
    :delivery_method: sidekiq
    :delivery_options:
      :redis_url: "{redis_url}"
      :redis_db: 0
      :queue: default
      :worker: EmailReceiverWorker
    :arbitration_method: redis
    :arbitration_options:
      :redis_url: "{redis_url}"
      :namespace: {namespace}
"""

# The same mailbox in gitlab.yml's keys, which the gateway reads as they are. delete_after_delivery is given
# explicitly: GitLab's template defaults it to true, the gateway's ImapSettings to false.
GATEWAY_CONFIG = """\
gitlab:
  host: localhost
incoming_email:
  address: "incoming+%{{key}}@localhost"
  host: "{host}"
  port: {port}
  ssl: false
  start_tls: false
  user: "{user}"
  password: "{password}"
  mailbox: inbox
  idle_timeout: 60
  delete_after_delivery: true
  expunge_deleted: false
  delivery_method: sidekiq
spool:
  path: {spool}
redis:
  url: {redis_url}
"""


# --- messages and mailboxes --------------------------------------------------------------------------------


def bench_message(tag: str, number: int, size: int) -> bytes:
    """A distinct ~``size``-byte text message to a valid reply key, so both collectors make a job of it."""
    headers = (
        "From: Bench <bench@example.org>\r\n"
        f"To: {GATEWAY_RCPT}\r\n"
        f"Subject: collect bench {tag} {number}\r\n"
        f"Message-ID: <{tag}-{number}@bench.test>\r\n"
        f"Date: {formatdate()}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    line = f"{tag} {number} " + "lorem ipsum dolor sit amet " * 3
    body = (line[:76] + "\r\n") * max(1, (size - len(headers)) // 78)
    return (headers + body).encode()


MESSAGE_ID = re.compile(r"^Message-ID: <([^>]+)>", re.MULTILINE | re.IGNORECASE)


class Lmtp:
    """One LMTP session into Dovecot, kept open; ``send`` returns when the ``250`` for the message is in."""

    def __init__(self, dovecot: DovecotServer) -> None:
        self.rcpt = f"{dovecot.user}@localhost"
        self.client = smtplib.LMTP(dovecot.host, dovecot.lmtp_port)

    def send(self, raw: bytes) -> None:
        self.client.sendmail("bench@example.org", [self.rcpt], raw)

    def close(self) -> None:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            self.client.quit()


def fill(dovecot: DovecotServer, tag: str, messages: int, size: int) -> float:
    """Deliver the backlog; the seconds it took (Dovecot's LMTP rate, for the record)."""
    started = time.perf_counter()
    lmtp = Lmtp(dovecot)
    try:
        for n in range(messages):
            lmtp.send(bench_message(tag, n, size))
    finally:
        lmtp.close()
    return time.perf_counter() - started


def imap_titles(dovecot: DovecotServer) -> list[str]:
    """The process titles of this Dovecot's imap processes (``verbose_proctitle``): ``[gitlab 127.0.0.1 IDLE]``."""
    prefix = f"dovecot-test-{dovecot.imap_port}/imap ["
    titles = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            title = path.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if title.startswith(prefix):
                titles.append(title)
    return titles


def wait_idle(dovecot: DovecotServer, proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    """Until a client of this Dovecot is in IDLE: the server's own view, the same for every collector."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(title.endswith(" IDLE]") for title in imap_titles(dovecot)):
            return True
        if proc is not None and not process_running(proc):
            return False
        time.sleep(0.01)
    return False


# --- the collectors ----------------------------------------------------------------------------------------


def gateway_argv(config: Path, once: bool) -> list[str]:
    return [
        gateway_script(),
        "collect",
        "--config",
        str(config),
        "--log-json",
        "--log-level",
        "info",
        *(["--once"] if once else []),
    ]


def start_collector(
    leg: str, run_dir: Path, dovecot: DovecotServer, redis: RedisServer, mail_room: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """Write the collector's configuration and start it; (process, the log to check afterwards)."""
    run_dir.mkdir(parents=True)
    common = {
        "host": dovecot.host,
        "port": dovecot.imap_port,
        "user": dovecot.user,
        "password": dovecot.password,
        "redis_url": redis.url,
    }
    if leg == "mail_room":
        log_path = run_dir / "mail_room_json.log"
        config = run_dir / "mail_room.yml"
        config.write_text(MAIL_ROOM_CONFIG.format(**common, log_path=log_path, namespace=ARBITRATION_NAMESPACE))
        config.chmod(0o600)
        return start_process([mail_room, "-c", str(config)], cwd=run_dir, output=run_dir / "stdout.log"), log_path
    config = run_dir / "gateway.yml"
    config.write_text(GATEWAY_CONFIG.format(**common, spool=run_dir / "spool"))
    config.chmod(0o600)
    log_path = run_dir / "collect.log"
    return start_process(gateway_argv(config, once=leg == "gateway-once"), cwd=run_dir, output=log_path), log_path


def reap(proc: subprocess.Popen[bytes], *, terminate: bool, timeout: float) -> tuple[int | None, Any]:
    """(exit status or None if it had to be killed, rusage) of a collector, which never outlives this call.

    SIGTERM (if asked), wait, then SIGKILL to the whole group while the leader is still an unreaped zombie (so
    its pid, the group id, cannot have been recycled), then ``wait4``: its rusage has the peak RSS and the CPU.
    """
    if terminate and process_running(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_running(proc) and time.monotonic() < deadline:
        time.sleep(0.01)
    killed = process_running(proc)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (None if killed else proc.returncode), usage


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def collector_log_problems(leg: str, path: Path, before_stop: int) -> list[str]:
    """Warnings and errors a collector logged (JSON lines both).

    mail_room's log is read only up to ``before_stop`` (its size when SIGTERM was sent): on SIGTERM its ``quit``
    resets the IMAP connection while the watcher thread still runs one more pass, which logs "Disconnected.
    Resetting..." (a BAD for a command on a fresh, unauthenticated connection). That is how it shuts down, not
    something the benchmark did to it. The gateway's log is read whole: it must stop cleanly.
    """
    if leg != "mail_room":
        expected = ("lmtp-gateway: collecting from", "incoming_email: ", "delivered ")
        return [line for line in log_problems(path) if not line.startswith(expected)]
    problems = []
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        for line in handle.read(before_stop).decode(errors="replace").splitlines():
            if line.startswith("# Logfile created on"):  # Ruby Logger's header
                continue
            try:
                severity = json.loads(line).get("severity")
            except (ValueError, AttributeError):
                problems.append(line)
                continue
            if severity not in ("INFO", "DEBUG"):
                problems.append(line)
    return problems


# --- drain -------------------------------------------------------------------------------------------------


@dataclass
class DrainRun:
    """One collector draining one backlog: how fast, how much memory and CPU, and the proof it all arrived."""

    leg: str
    messages: int
    fill_s: float | None = None
    seconds: float | None = None  # collector start to the Nth job in Redis
    msgs_per_s: float | None = None
    first_job_s: float | None = None  # start-up: collector start to the first job
    steady_msgs_per_s: float | None = None  # first job to the Nth
    exit_s: float | None = None  # --once: collector start to its exit
    idle_again_s: float | None = None  # daemons: collector start to IDLE again (every message flagged)
    exit_status: int | None = None
    peak_rss_mb: float | None = None
    cpu_s: float | None = None
    cpu_ms_per_msg: float | None = None
    ok: bool = False
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_jobs(client: Any, tag: str, messages: int) -> list[str]:
    """Every job an EmailReceiverWorker in ``queue:default``, every backlog message exactly once."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    length = client.llen(QUEUE_KEY)
    for start in range(0, length, 500):
        for raw in client.lrange(QUEUE_KEY, start, start + 499):
            job = json.loads(raw)
            if job.get("class") != WORKER and len(problems) < 3:
                problems.append(f"job class {job.get('class')!r}, expected {WORKER}")
            match = MESSAGE_ID.search(job["args"][0])
            key = match.group(1) if match else "?"
            seen[key] = seen.get(key, 0) + 1
    expected = {f"{tag}-{n}@bench.test" for n in range(messages)}
    if length != messages:
        problems.append(f"{length} jobs in {QUEUE_KEY}, expected {messages}")
    if missing := expected - seen.keys():
        problems.append(f"{len(missing)} messages have no job")
    if doubled := [key for key, count in seen.items() if count > 1]:
        problems.append(f"{len(doubled)} messages have more than one job")
    if strays := seen.keys() - expected:
        problems.append(f"{len(strays)} jobs for messages not in the backlog")
    return problems


def check_mailbox(dovecot: DovecotServer, messages: int) -> list[str]:
    """GitLab's delete_after_delivery: every message flagged \\Deleted (expunge_deleted is false)."""
    with Inspector(dovecot) as mailbox:
        flags = mailbox.flags()
    deleted = sum(1 for f in flags.values() if r"\Deleted" in f)
    if len(flags) != messages or deleted != messages:
        return [f"mailbox: {len(flags)} messages, {deleted} flagged \\Deleted, expected {messages} and {messages}"]
    return []


def bench_drain(
    leg: str,
    *,
    run_dir: Path,
    redis: RedisServer,
    client: Any,
    messages: int,
    size: int,
    timeout: float,
    stall: float,
    mail_room: str,
) -> DrainRun:
    """One drain on a fresh Dovecot and a flushed Redis (mail_room's arbitration keys are per UID, and UIDs start
    at 1 again in every fresh mailbox)."""
    result = DrainRun(leg, messages)
    tag = run_dir.name
    dovecot = DovecotServer()
    proc: subprocess.Popen[bytes] | None = None
    try:
        dovecot.start()
        result.fill_s = fill(dovecot, tag, messages, size)
        client.flushall()
        proc, log_path = start_collector(leg, run_dir, dovecot, redis, mail_room)
        started = time.perf_counter()
        deadline = started + timeout
        count = 0
        progress = started  # when the count last grew: a collector that stops making progress is given up on
        while count < messages and time.perf_counter() < deadline:
            now_count = client.llen(QUEUE_KEY)
            now = time.perf_counter()
            if now_count > count:
                count, progress = now_count, now
            if count and result.first_job_s is None:
                result.first_job_s = now - started
            if count < messages:
                if not process_running(proc) and client.llen(QUEUE_KEY) < messages:
                    result.errors.append(f"collector exited with {count} of {messages} jobs in Redis")
                    break
                if now - progress > stall:
                    result.errors.append(f"stalled: no new job for {stall:.0f} s, {count} of {messages} in Redis")
                    break
                time.sleep(POLL_S)
        done = time.perf_counter()
        if count >= messages:
            result.seconds = done - started
            result.msgs_per_s = messages / result.seconds
            if result.first_job_s is not None and result.seconds > result.first_job_s:
                result.steady_msgs_per_s = (messages - 1) / (result.seconds - result.first_job_s)
        elif not result.errors:
            result.errors.append(f"timed out after {timeout:.0f}s with {count} of {messages} jobs")
        if result.errors:  # no point waiting for it: stop it and keep what its log says
            before_stop = log_size(log_path)
            status, usage = reap(proc, terminate=True, timeout=10)
            result.exit_status = status
            problems = collector_log_problems(leg, log_path, before_stop)
            if problems:
                result.errors.append("log: " + " | ".join(summarize(problems)))
            return result
        if leg == "gateway-once":
            status, usage = reap(proc, terminate=False, timeout=max(1.0, deadline - time.perf_counter()))
            result.exit_s = time.perf_counter() - started
            before_stop = log_size(log_path)
        else:
            # The jobs are in Redis before the messages are flagged on the server (mail_room flags them one
            # STORE at a time after delivering the whole batch): stop only once the collector idles again.
            if wait_idle(dovecot, proc, timeout=max(1.0, deadline - time.perf_counter())):
                result.idle_again_s = time.perf_counter() - started
            else:
                result.errors.append("the collector did not go back to IDLE after the drain")
            before_stop = log_size(log_path)
            status, usage = reap(proc, terminate=True, timeout=30)
        result.exit_status = status
        result.peak_rss_mb = usage.ru_maxrss / 1024
        result.cpu_s = usage.ru_utime + usage.ru_stime
        result.cpu_ms_per_msg = result.cpu_s / messages * 1000
        if leg != "mail_room" and status != 0:
            result.errors.append(
                f"exit status {status} (expected 0{' after SIGTERM' if leg != 'gateway-once' else ''})"
            )
        elif leg == "mail_room" and status != 0:
            result.notes.append(f"mail_room exit status {status} after SIGTERM")
        result.errors.extend(check_jobs(client, tag, messages))
        result.errors.extend(check_mailbox(dovecot, messages))
        problems = collector_log_problems(leg, log_path, before_stop)
        if problems:
            result.errors.append("log: " + " | ".join(summarize(problems)))
    except Exception as error:  # a failed run is reported with the others, not a traceback that hides them
        result.errors.append(f"{type(error).__name__}: {error}")
    finally:
        if proc is not None:
            stop_process(proc)
        dovecot.stop(graceful=False)
    result.ok = not result.errors
    return result


# --- latency -----------------------------------------------------------------------------------------------


@dataclass
class LatencyRun:
    """Idle collector, one message at a time: LMTP 250 to the job's LPUSH (or, for the bare client, to EXISTS)."""

    leg: str
    samples_ms: list[float] = field(default_factory=list)
    ok: bool = False
    errors: list[str] = field(default_factory=list)


class IdleClient:
    """A bare IMAP IDLE client over a socket: Dovecot's own push delay, with no collector work behind it."""

    def __init__(self, dovecot: DovecotServer) -> None:
        self.sock = socket.create_connection((dovecot.host, dovecot.imap_port), timeout=10)
        self.buffer = b""
        self.line()  # greeting
        self.command(b"a LOGIN " + dovecot.user.encode() + b" " + dovecot.password.encode())
        self.command(b"b SELECT INBOX")
        self.idle()

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("IMAP connection closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def command(self, command: bytes) -> None:
        tag = command.split(b" ", 1)[0]
        self.sock.sendall(command + b"\r\n")
        while not (line := self.line()).startswith(tag + b" "):
            pass
        if not line.startswith(tag + b" OK"):
            raise ConnectionError(line.decode(errors="replace"))

    def idle(self) -> None:
        self.sock.sendall(b"i IDLE\r\n")
        while not self.line().startswith(b"+"):
            pass

    def wait_exists(self) -> None:
        while not self.line().endswith(b" EXISTS"):
            pass

    def done(self) -> None:
        self.sock.sendall(b"DONE\r\n")
        while not self.line().startswith(b"i "):
            pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def bench_latency(
    leg: str, *, run_dir: Path, redis: RedisServer, client: Any, samples: int, size: int, mail_room: str
) -> LatencyRun:
    result = LatencyRun(leg)
    dovecot = DovecotServer()
    proc: subprocess.Popen[bytes] | None = None
    idle_client: IdleClient | None = None
    lmtp: Lmtp | None = None
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        dovecot.start()
        client.flushall()
        client.config_set("notify-keyspace-events", "Kl")  # list commands on a key: the LPUSH of the job
        pubsub.subscribe(f"__keyspace@0__:{QUEUE_KEY}")
        pubsub.get_message(timeout=1.0)  # the subscription is confirmed
        if leg == "dovecot-idle":
            idle_client = IdleClient(dovecot)
        else:
            proc, log_path = start_collector(leg, run_dir, dovecot, redis, mail_room)
        lmtp = Lmtp(dovecot)
        for n in range(samples):
            if proc is not None and not wait_idle(dovecot, proc, timeout=30):
                result.errors.append(f"sample {n}: the collector did not go back to IDLE within 30 s")
                break
            time.sleep(0.1 + random.random() * 0.1)  # settled in IDLE; jitter so nothing phase-locks
            lmtp.send(bench_message(run_dir.name, n, size))
            sent = time.perf_counter()
            if idle_client is not None:
                idle_client.wait_exists()
                arrived = time.perf_counter()
                idle_client.done()
                idle_client.idle()
            else:
                event = None
                while event is None and time.perf_counter() - sent < 10:
                    event = pubsub.get_message(timeout=10)
                arrived = time.perf_counter()
                if event is None or event.get("data") != b"lpush":
                    result.errors.append(f"sample {n}: no LPUSH on {QUEUE_KEY} within 10 s (got {event!r})")
                    break
            result.samples_ms.append((arrived - sent) * 1000)
        if proc is not None:
            if client.llen(QUEUE_KEY) != len(result.samples_ms):
                result.errors.append(f"{client.llen(QUEUE_KEY)} jobs for {len(result.samples_ms)} messages")
            if not wait_idle(dovecot, proc, timeout=30):
                result.errors.append("the collector did not go back to IDLE after the last sample")
            before_stop = log_size(log_path)
            status, _ = reap(proc, terminate=True, timeout=30)
            if leg != "mail_room" and status != 0:
                result.errors.append(f"exit status {status} after SIGTERM (expected 0)")
            problems = collector_log_problems(leg, log_path, before_stop)
            if problems:
                result.errors.append("log: " + " | ".join(summarize(problems)))
    except Exception as error:
        result.errors.append(f"{type(error).__name__}: {error}")
    finally:
        with contextlib.suppress(Exception):
            pubsub.close()
        with contextlib.suppress(Exception):
            client.config_set("notify-keyspace-events", "")
        if lmtp is not None:
            lmtp.close()
        if idle_client is not None:
            idle_client.close()
        if proc is not None:
            stop_process(proc)
        dovecot.stop(graceful=False)
    result.ok = not result.errors and len(result.samples_ms) == samples
    return result


# --- report ------------------------------------------------------------------------------------------------


def p95(values: list[float]) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def summarize_drain(runs: list[DrainRun]) -> dict[str, Any]:
    rss = [r.peak_rss_mb for r in runs if r.peak_rss_mb is not None]
    return {
        "msgs_per_s": median([r.msgs_per_s for r in runs]),
        "msgs_per_s_runs": [r.msgs_per_s for r in runs],
        "first_job_s": median([r.first_job_s for r in runs]),
        "steady_msgs_per_s": median([r.steady_msgs_per_s for r in runs]),
        "done_with_mailbox_s": median([r.idle_again_s if r.exit_s is None else r.exit_s for r in runs]),
        "peak_rss_mb": max(rss) if rss else None,
        "cpu_ms_per_msg": median([r.cpu_ms_per_msg for r in runs]),
        "ok": all(r.ok for r in runs),
        "runs": [asdict(r) for r in runs],
    }


def summarize_latency(runs: list[LatencyRun], floor_p50: float | None) -> dict[str, Any]:
    samples = [s for r in runs for s in r.samples_ms]
    cuts = percentiles_ms([s / 1000 for s in samples])
    p50 = cuts["p50"]
    return {
        "samples": len(samples),
        "p50_ms": p50,
        "p95_ms": p95(samples),
        "max_ms": cuts["max"],
        "min_ms": min(samples) if samples else None,
        "added_over_dovecot_push_p50_ms": p50 - floor_p50 if p50 is not None and floor_p50 is not None else None,
        "samples_ms": samples,
        "ok": all(r.ok for r in runs),
        "errors": [e for r in runs for e in r.errors],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def print_report(
    drain: dict[str, Any], latency: dict[str, Any], ratios: dict[str, Any], args: argparse.Namespace
) -> None:
    print(
        f"\nDrain: {args.messages} messages of ~{args.size // 1024} KiB in a Dovecot mailbox, collector start to "
        f"{args.messages} jobs in Redis; median of {args.repeat}"
    )
    header = (
        f"{'collector':<30} {'msgs/s':>7} {'runs':<20} {'first job s':>11} {'steady msgs/s':>13} "
        f"{'all flagged s':>13} {'peak RSS MB':>11} {'CPU ms/msg':>10}  checks"
    )
    print(header)
    print("-" * len(header))
    for leg in DRAIN_LEGS:
        row = drain[leg]
        runs = ", ".join(fmt(v) for v in row["msgs_per_s_runs"])
        print(
            f"{LABELS[leg]:<30} {fmt(row['msgs_per_s']):>7} {'[' + runs + ']':<20} "
            f"{fmt(row['first_job_s'], '.2f'):>11} "
            f"{fmt(row['steady_msgs_per_s']):>13} {fmt(row['done_with_mailbox_s'], '.2f'):>13} "
            f"{fmt(row['peak_rss_mb'], '.1f'):>11} "
            f"{fmt(row['cpu_ms_per_msg'], '.2f'):>10}  {'ok' if row['ok'] else 'FAIL'}"
        )
    print(
        f"  drain ratio gateway/mail_room: --once {fmt(ratios['drain_once'], '.2f')}, daemon "
        f"{fmt(ratios['drain_daemon'], '.2f')} (target >= 1: {'met' if ratios['drain_target_met'] else 'NOT met'})"
    )
    print(
        "\nIdle-to-Redis latency: LMTP 250 to the job's LPUSH (bare client: to `* N EXISTS`), "
        f"{args.samples} x {args.repeat} samples"
    )
    header = (
        f"{'collector':<30} {'p50 ms':>8} {'p95 ms':>8} {'min ms':>8} {'max ms':>8} {'over Dovecot p50 ms':>20}  checks"
    )
    print(header)
    print("-" * len(header))
    for leg in LATENCY_LEGS:
        row = latency[leg]
        added = "(the floor)" if leg == "dovecot-idle" else fmt(row["added_over_dovecot_push_p50_ms"], ".1f")
        print(
            f"{LABELS[leg]:<30} {fmt(row['p50_ms'], '.1f'):>8} {fmt(row['p95_ms'], '.1f'):>8} "
            f"{fmt(row['min_ms'], '.1f'):>8} {fmt(row['max_ms'], '.1f'):>8} {added:>20}  "
            f"{'ok' if row['ok'] else 'FAIL'}"
        )
    print(
        f"  latency ratio mail_room/gateway: p50 {fmt(ratios['latency_p50'], '.2f')}, p95 "
        f"{fmt(ratios['latency_p95'], '.2f')}; of the time added over Dovecot's push (p50): "
        f"{fmt(ratios['latency_added_p50'], '.1f')} "
        f"(target >= 5: {'met' if ratios['latency_target_met'] else 'NOT met'})"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="backlog per drain run (default 2000)")
    parser.add_argument("--size", type=int, default=10240, help="message size in bytes (default 10240)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, each running every leg once (default 3)")
    parser.add_argument("--samples", type=int, default=7, help="latency samples per leg and round (default 7)")
    parser.add_argument("--quick", action="store_true", help="300 messages, 1 round, 8 samples (~1 minute)")
    parser.add_argument("--timeout", type=float, default=300, help="limit per drain in s (default 300)")
    parser.add_argument(
        "--stall", type=float, default=30, help="give a drain up after this many s without a new job (default 30)"
    )
    parser.add_argument("--mail-room", default=None, help="the mail_room executable (default: mail_room on PATH)")
    parser.add_argument("--scratch", choices=CHOICES, default="auto", help=SCRATCH_HELP)
    parser.add_argument("--ref", metavar="COMMIT", help="measure the gateway as of this git commit")
    parser.add_argument("--output", type=Path, default=DEFAULT_RESULTS, help="JSON results (default: next to this)")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.repeat, args.samples = 300, 1, 8
    if min(args.messages, args.size, args.repeat, args.samples) < 1:
        parser.error("--messages, --size, --repeat and --samples must be positive")
    return args


def mail_room_versions(mail_room: str) -> dict[str, str]:
    """What mail_room reports of itself and which Debian package it came from."""
    info = {"binary": mail_room}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        version = subprocess.run(
            ["ruby", "-e", "require 'mail_room/version'; print MailRoom::VERSION"], capture_output=True, text=True
        )
        info["version"] = version.stdout.strip()
        package = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "ruby-mail-room"], capture_output=True, text=True
        )
        info["debian_package"] = f"ruby-mail-room {package.stdout.strip()}"
        info["ruby"] = subprocess.run(["ruby", "--version"], capture_output=True, text=True).stdout.strip()
    return info


def rounds(legs: tuple[str, ...], repeat: int) -> Iterator[tuple[int, str]]:
    """Every leg once per round, the order rotated each round so a drifting machine load hits all alike."""
    for n in range(repeat):
        shift = n % len(legs)
        for leg in legs[shift:] + legs[:shift]:
            yield n, leg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return measure_on_scratch(args.scratch, lambda scratch: measure(args, scratch))


def measure(args: argparse.Namespace, scratch: str) -> int:
    mail_room = args.mail_room or require_binary("mail_room", "ruby-mail-room ruby-redis ruby-redis-namespace")
    import redis as redis_py  # the gateway's own dependency, in its virtualenv

    workdir = Path(tempfile.mkdtemp(prefix="collect-bench-"))
    redis = RedisServer()
    drain_runs: dict[str, list[DrainRun]] = {leg: [] for leg in DRAIN_LEGS}
    latency_runs: dict[str, list[LatencyRun]] = {leg: [] for leg in LATENCY_LEGS}
    load_before = load_at_start()
    started = time.monotonic()
    try:
        code = {**git_state(args.ref), "source_sha256": code_digest(snapshot_code(workdir, args.ref))}
        create_before = file_create_us(workdir)
        redis.start()
        client = redis_py.Redis.from_url(redis.url, socket_timeout=30)
        for n, leg in rounds(DRAIN_LEGS, args.repeat):
            print(f"drain round {n + 1}/{args.repeat}: {LABELS[leg]} ...", file=sys.stderr)
            run = bench_drain(
                leg,
                run_dir=workdir / f"drain-{leg}-{n}",
                redis=redis,
                client=client,
                messages=args.messages,
                size=args.size,
                timeout=args.timeout,
                stall=args.stall,
                mail_room=mail_room,
            )
            drain_runs[leg].append(run)
            print(
                f"  {fmt(run.msgs_per_s)} msgs/s{'' if run.ok else ' FAILED: ' + '; '.join(run.errors)}",
                file=sys.stderr,
            )
        for n, leg in rounds(LATENCY_LEGS, args.repeat):
            print(f"latency round {n + 1}/{args.repeat}: {LABELS[leg]} ...", file=sys.stderr)
            lat = bench_latency(
                leg,
                run_dir=workdir / f"latency-{leg}-{n}",
                redis=redis,
                client=client,
                samples=args.samples,
                size=args.size,
                mail_room=mail_room,
            )
            latency_runs[leg].append(lat)
            if not lat.ok:
                print(f"  FAILED: {'; '.join(lat.errors)}", file=sys.stderr)
        client.close()
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    drain = {leg: summarize_drain(runs) for leg, runs in drain_runs.items()}
    floor = summarize_latency(latency_runs["dovecot-idle"], None)
    latency = {
        leg: floor if leg == "dovecot-idle" else summarize_latency(runs, floor["p50_ms"])
        for leg, runs in latency_runs.items()
    }
    mr, gw = latency["mail_room"], latency["gateway-daemon"]
    ratios: dict[str, Any] = {
        "drain_once": ratio(drain["gateway-once"]["msgs_per_s"], drain["mail_room"]["msgs_per_s"]),
        "drain_daemon": ratio(drain["gateway-daemon"]["msgs_per_s"], drain["mail_room"]["msgs_per_s"]),
        "latency_p50": ratio(mr["p50_ms"], gw["p50_ms"]),
        "latency_p95": ratio(mr["p95_ms"], gw["p95_ms"]),
        "latency_added_p50": ratio(mr["added_over_dovecot_push_p50_ms"], gw["added_over_dovecot_push_p50_ms"]),
    }
    ratios["drain_target_met"] = bool(
        ratios["drain_once"] and ratios["drain_daemon"] and min(ratios["drain_once"], ratios["drain_daemon"]) >= 1
    )
    ratios["latency_target_met"] = bool(ratios["latency_p50"] and ratios["latency_p50"] >= 5)
    results = {
        "benchmark": "collect",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "params": {
            "messages": args.messages,
            "size": args.size,
            "repeat": args.repeat,
            "samples_per_round": args.samples,
            "quick": args.quick,
        },
        "gateway_code": code,
        "mail_room": {
            **mail_room_versions(mail_room),
            "config": MAIL_ROOM_CONFIG.replace('"{password}"', '"<redacted>"'),
        },
        "gateway_config": GATEWAY_CONFIG.replace('"{password}"', '"<redacted>"'),
        "machine": {
            **machine(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "scratch": scratch,
            "file_create_us_before": create_before,
            "wall_s": time.monotonic() - started,
        },
        "drain": drain,
        "latency": latency,
        "ratios": ratios,
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_report(drain, latency, ratios, args)
    print(
        f"  load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); "
        f"wall time {time.monotonic() - started:.0f} s; gateway snapshot {code['source_sha256']} of "
        f"{code.get('commit', '?')}"
    )
    failures = [f"drain {LABELS[r.leg]}: {e}" for runs in drain_runs.values() for r in runs for e in r.errors]
    failures += [f"latency {LABELS[r.leg]}: {e}" for runs in latency_runs.values() for r in runs for e in r.errors]
    notes = sorted({n for runs in drain_runs.values() for r in runs for n in r.notes})
    for note in notes:
        print(f"  note: {note}")
    print("\nfailed checks:" if failures else "\nall checks passed: every message once in Redis, flagged on the server")
    for line in failures:
        print(f"  - {line}")
    print(f"\nresults written to {args.output}")
    ok = all(row["ok"] for row in drain.values()) and all(row["ok"] for row in latency.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
