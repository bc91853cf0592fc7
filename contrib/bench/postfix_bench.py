"""End-to-end benchmark: SMTP into a real Postfix, LMTP to the next hop, delivered - gateway against Dovecot.

``lmtp_bench.py`` measures the gateway's LMTP server alone. In production Postfix sits in front of it, and the
question that matters there is whether the gateway ever becomes the bottleneck of the whole path. So the same
load (``smtp-source`` speaking SMTP to Postfix, a new connection per message like sending servers do) goes
through two otherwise identical Postfix instances whose LMTP next hop differs:

1. ``lmtp-gateway`` (configured with exactly what ``lmtp-gateway postfix-config`` prints, policy service and milter
   included), delivering Sidekiq jobs into a real Redis: done when ``LLEN queue:default`` reaches the count;
2. Dovecot's LMTP, delivering to a Maildir: done when the files in the Maildir reach the count.

The clock runs from the start of ``smtp-source`` until the last message has been delivered by the next hop
(polled every 20 ms), so it includes Postfix's queue, its LMTP client and the next hop's work. One warm-up
message per leg goes through first and is not timed: it pays the one-off costs (recipient verification probe,
first connections, Python imports). Postfix's delivery settings (concurrency 20 per destination, connection
cache) are its defaults in both legs. The result is msgs/s per leg and the ratio gateway/dovecot; >= 1.0 means
the gateway is not what limits the path.

Every leg is checked: exactly N messages delivered (distinct Sidekiq jids for the gateway), nothing bounced or
deferred in Postfix's maillog, Postfix's queue empty, ``smtp-source`` exited cleanly.

Run as root (Postfix), from the repository root::

    .venv/bin/python contrib/bench/postfix_bench.py [--messages 2000] [--sessions 16] [--size 10240]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Beside this file; importing common first also puts the repository root on sys.path, for tests.servers.
from common import (
    QUEUE_KEY,
    REPLY_KEY,
    REPO,
    WORKER,
    code_digest,
    cpu_times,
    fmt,
    gateway_script,
    greets,
    queued_jobs,
    read_journal,
    summarize,
)
from scratch import CHOICES, measure_on_scratch
from scratch import HELP as SCRATCH_HELP

from tests.servers import free_port, process_running, require_binary, start_process, stop_process, wait_until
from tests.servers.dovecot import DovecotServer
from tests.servers.postfix import PostfixServer, lmtp_next_hop, postfix_for_gateway
from tests.servers.redis import RedisServer

DOMAIN = "incoming.test"
GATEWAY_RCPT = f"incoming+{REPLY_KEY}@{DOMAIN}"  # a valid reply key: one Sidekiq job each
DOVECOT_RCPT = f"gitlab@{DOMAIN}"  # DovecotServer's default user, any domain
SENDER = "sender@example.org"
POLL_INTERVAL = 0.02
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results-postfix.json"

GATEWAY_CONFIG = """\
gitlab:
  host: gitlab.test
incoming_email:
  address: "incoming+%{{key}}@{domain}"
  delivery_method: sidekiq
lmtp:
  listen: "127.0.0.1:{lmtp_port}"
policy:
  listen: "127.0.0.1:{policy_port}"
milter:
  listen: "127.0.0.1:{milter_port}"
spool:
  path: {spool}
redis:
  url: {redis_url}
"""

# postfix/lmtp[PID]: QUEUEID: to=<rcpt>, relay=..., [conn_use=N, ]delay=D, delays=a/b/c/d, dsn=X, status=S
_DELIVERY_RE = re.compile(
    r"postfix/(?:[\w.-]+/)*lmtp\[(?P<pid>\d+)\]: (?P<qid>\w+): to=<(?P<rcpt>[^>]*)>,.*?"
    r"(?:conn_use=(?P<conn_use>\d+), )?delay=(?P<delay>[\d.]+), "
    r"delays=(?P<a>[\d.]+)/(?P<b>[\d.]+)/(?P<c>[\d.]+)/(?P<d>[\d.]+),.*?status=(?P<status>\w+)"
)


class LegTimeout(Exception):
    """A leg ran past its time limit: its numbers would be meaningless, so it is aborted."""


@dataclass
class Leg:
    """One next hop under the load: the speed, and the evidence that every message arrived exactly once."""

    next_hop: str
    messages: int
    sessions: int
    size: int
    seconds: float | None = None
    msgs_per_s: float | None = None
    accept_seconds: float | None = None  # smtp-source start to its exit: Postfix took every message
    delivered: int = 0  # measured messages at the next hop (warm-up excluded)
    ok: bool = False
    errors: list[str] = field(default_factory=list)
    postfix: dict[str, Any] = field(default_factory=dict)  # what the maillog and the sampler saw
    extra: dict[str, Any] = field(default_factory=dict)


# --- small helpers -----------------------------------------------------------------------------------------


def port_open(port: int) -> bool:
    """True once something listens on ``port``: the policy service is up."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def lmtp_connections(port: int) -> int:
    """Established TCP connections *to* ``port``: how many LMTP sessions Postfix holds open right now.

    Read from /proc/net/tcp (remote port = the next hop's), so it counts Postfix's concurrency as the next
    hop sees it, without asking either side. Idle connections parked in Postfix's connection cache are
    included although the concurrency limit does not count them: the maximum may exceed the limit, the mean
    shows the concurrency Postfix actually used.
    """
    wanted = f":{port:04X}"
    count = 0
    with contextlib.suppress(OSError), open("/proc/net/tcp") as table:
        next(table, None)
        for line in table:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "01" and fields[2].endswith(wanted):
                count += 1
    return count


def own_cpu() -> tuple[float, float]:
    """(this process, its reaped children) CPU seconds: the polling's cost and smtp-source's."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


FOREIGN_MARKERS = ("lmtp_bench.py", "pytest")
FOREIGN_CPU_LIMIT = 0.05  # cores: more foreign load than this during a leg marks it as disturbed


def foreign_load() -> set[str]:
    """Command lines of other benchmarks and test runs on the machine right now.

    With two CPUs, anyone else's load shows directly in the numbers; a leg that shares the machine is
    flagged (``disturbed_by``) so its figures are not mistaken for clean ones. /proc is read directly:
    cheap enough to do during the timed phase, unlike starting pgrep.
    """
    me = os.getpid()
    found: set[str] = set()
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if int(path.parent.name) == me:
                continue
            argv = path.read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue
        # Only the program and its first arguments: a leftover server whose config path mentions pytest's
        # temporary directory is idle, not a test run.
        program = " ".join(os.path.basename(arg) for arg in argv[:3])
        if any(marker in program for marker in FOREIGN_MARKERS):
            found.add(" ".join(argv).strip()[:160])
    return found


@dataclass(frozen=True)
class ProcessCpu:
    """One process's CPU ticks so far - its own and its reaped children's - and who it is."""

    pgid: int
    ppid: int
    kernel: bool
    own: int
    children: int
    name: str


def process_snapshot() -> dict[tuple[int, int], ProcessCpu]:
    """Every process's CPU ticks, keyed by (pid, start time) so a recycled pid is not mistaken for the old."""
    snapshot: dict[tuple[int, int], ProcessCpu] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, tail = stat.read_text().rsplit(")", 1)
            fields = tail.split()
            pid, ppid = int(stat.parent.name), int(fields[1])
            kernel = bool(int(fields[6]) & 0x00200000) or pid == 2 or ppid == 2  # PF_KTHREAD
            own, children = int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])
            snapshot[(pid, int(fields[19]))] = ProcessCpu(
                int(fields[2]), ppid, kernel, own, children, head.split("(", 1)[1]
            )
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
    return snapshot


@dataclass
class CpuAccount:
    """CPU seconds between two snapshots: per component of the path, kernel threads, and everybody else."""

    components: dict[str, float]
    kernel_threads: float
    foreign: float
    foreign_top: list[str]


def account_cpu(
    before: dict[tuple[int, int], ProcessCpu], after: dict[tuple[int, int], ProcessCpu], roots: dict[str, int]
) -> CpuAccount:
    """Share out the CPU used between two snapshots.

    A component (Postfix, Dovecot, the gateway ...) is its root process, its process group and the root's
    direct children: Postfix's verify daemon, for one, runs in a session of its own. Helpers that exited
    meanwhile are in their parent's reaped-children time, so nothing of a component is lost. Kernel threads
    belong to the path too (the file system's journal commits the fsyncs). Everything else is foreign: load
    somebody else put on the same CPUs. Init's reaped children are left out - they are orphans, such as the
    previous leg's killed Postfix daemons, reaped whenever init gets to it.
    """
    tick = os.sysconf("SC_CLK_TCK")
    members = {pid: name for name, pid in roots.items()}
    components = dict.fromkeys(roots, 0)
    kernel = 0
    foreign: dict[str, int] = {}
    me, my_group = os.getpid(), os.getpgrp()
    for key, proc in after.items():
        pid = key[0]
        old = before.get(key)
        own = proc.own - (old.own if old else 0)
        children = 0 if pid == 1 else proc.children - (old.children if old else 0)
        used = own + children
        owner = members.get(pid) or members.get(proc.pgid) or members.get(proc.ppid)
        if owner:
            components[owner] += used
        elif used <= 0 or pid == me or proc.pgid == my_group or proc.ppid == me:
            continue  # this script and what it runs: measured by getrusage, or idle (Postfix's supervisor)
        elif proc.kernel:
            kernel += used
        else:
            cmdline = proc.name
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                cmdline = b" ".join(argv).decode(errors="replace").strip()[:160] or proc.name
            foreign[cmdline] = foreign.get(cmdline, 0) + used
    for key, proc in before.items():
        owner = members.get(proc.pgid) or members.get(proc.ppid)
        if key not in after and owner:
            # Exited and reaped meanwhile: its whole life is now in the parent's children time, including
            # what it had used before the first snapshot.
            components[owner] -= proc.own + proc.children
    top = sorted(foreign.items(), key=lambda item: -item[1])[:3]
    return CpuAccount(
        {name: ticks / tick for name, ticks in components.items()},
        kernel / tick,
        sum(foreign.values()) / tick,
        [f"{ticks / tick:.2f}s {cmd}" for cmd, ticks in top],
    )


def quantiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/max of Postfix's per-message ``delay=`` (seconds): how long mail sat in Postfix."""
    if not values:
        return {"p50": None, "p90": None, "max": None}
    if len(values) == 1:
        return {"p50": values[0], "p90": values[0], "max": values[0]}
    cuts = statistics.quantiles(values, n=10, method="inclusive")
    return {"p50": statistics.median(values), "p90": cuts[8], "max": max(values)}


def log_key(line: str) -> str:
    """A log line without its timestamp and pids (and queue ids), for ``summarize``: one event, one count."""
    return re.sub(r"^\S+\s+\S+\s+\S+\s+\S+\s+|\[\d+\]|\b[0-9A-F]{6,}\b", "", line)[:240]


def git_head() -> str | None:
    """The commit of the working tree, for the results file."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None
    return None


def versions() -> dict[str, str]:
    """Versions of everything on the path, so results from different machines can be told apart."""
    found: dict[str, str] = {"python": platform.python_version()}
    probes = {
        "postfix": ["postconf", "-dh", "mail_version"],
        "dovecot": ["dovecot", "--version"],
        "redis": ["redis-server", "--version"],
    }
    for name, argv in probes.items():
        with contextlib.suppress(OSError, subprocess.SubprocessError, RuntimeError):
            argv[0] = require_binary(argv[0], name)
            found[name] = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    return found


# --- one leg -------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """What a leg needs to know about its next hop: where Postfix sends, and how to count arrivals."""

    name: str
    rcpt: str
    lmtp_port: int
    count: Callable[[], int]
    postfix: PostfixServer
    groups: dict[str, int] = field(default_factory=dict)  # component -> root process, for CPU accounting


def smtp_source(
    binary: str, *, port: int, rcpt: str, messages: int, sessions: int, size: int
) -> subprocess.Popen[bytes]:
    """Start ``smtp-source`` speaking SMTP (no ``-L``) to Postfix, a new connection per message (no ``-d``)."""
    argv = [binary, "-s", str(sessions), "-m", str(messages), "-l", str(size), "-f", SENDER, "-t", rcpt,
            f"127.0.0.1:{port}"]  # fmt: skip
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_count(target: Target, expected: int, deadline: float, what: str) -> None:
    """Poll the next hop's count until it reaches ``expected``; raise LegTimeout at the deadline."""
    while target.count() < expected:
        if time.monotonic() > deadline:
            raise LegTimeout(f"{what}: {target.count()} of {expected} delivered when the leg's time ran out")
        time.sleep(POLL_INTERVAL)


def run_leg(target: Target, args: argparse.Namespace, leg: Leg, smtp_source_bin: str) -> None:
    """Warm up with one message, then time N messages from smtp-source start to the last delivery."""
    deadline = time.monotonic() + args.leg_timeout
    postfix = target.postfix

    # Warm-up: one message through the whole path, not timed (verify probe, first connections, imports).
    warm = smtp_source(smtp_source_bin, port=postfix.port, rcpt=target.rcpt, messages=1, sessions=1, size=args.size)
    _, err = warm.communicate(timeout=max(1.0, deadline - time.monotonic()))
    if warm.returncode != 0:
        raise RuntimeError(f"warm-up smtp-source exited {warm.returncode}: {err.decode(errors='replace').strip()}")
    wait_count(target, 1, deadline, "warm-up")
    baseline = target.count()
    if baseline != 1:
        raise RuntimeError(f"after the warm-up the next hop holds {baseline} messages, expected 1")
    wait_until(lambda: not postfix.queue(), timeout=max(1.0, deadline - time.monotonic()), what="warm-up queue")
    log_offset = len(postfix.maillog_text())
    expected = baseline + args.messages

    machine0 = cpu_times()
    self0, children0 = own_cpu()
    processes0 = process_snapshot()
    samples: list[int] = []
    foreign = foreign_load()
    started = time.perf_counter()
    source = smtp_source(
        smtp_source_bin, port=postfix.port, rcpt=target.rcpt, messages=args.messages, sessions=args.sessions,
        size=args.size,
    )  # fmt: skip
    accepted_at: float | None = None
    polls = 0
    try:
        while True:
            count = target.count()
            if count >= expected:
                break
            if accepted_at is None and source.poll() is not None:
                accepted_at = time.perf_counter()
            if polls % 25 == 0:  # every 500 ms: /proc/net/tcp alone costs ~6 ms, not to compete with the path
                samples.append(lmtp_connections(target.lmtp_port))
                foreign |= foreign_load()
            polls += 1
            if time.monotonic() > deadline:
                raise LegTimeout(
                    f"{count - baseline} of {args.messages} messages delivered after "
                    f"{time.perf_counter() - started:.0f}s (leg limit {args.leg_timeout:.0f}s)"
                )
            time.sleep(POLL_INTERVAL)
        finished = time.perf_counter()
    finally:
        if source.poll() is None and accepted_at is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                source.wait(timeout=max(0.1, min(30.0, deadline - time.monotonic())))
        if source.poll() is None:
            source.kill()
        out, err = source.communicate()
    foreign |= foreign_load()
    machine1 = cpu_times()
    self1, children1 = own_cpu()
    processes1 = process_snapshot()
    if accepted_at is None:
        accepted_at = finished  # smtp-source ended after the last delivery was seen (its QUITs)

    leg.seconds = finished - started
    leg.msgs_per_s = args.messages / leg.seconds
    leg.accept_seconds = accepted_at - started
    spent = {key: machine1[key] - machine0[key] for key in machine0}
    for key in ("busy", "iowait", "steal"):  # shares of all CPUs' time during the timed phase
        leg.extra[f"machine_cpu_{key}"] = round(spent[key] / max(1, spent["total"]), 3)
    # CPU milliseconds per timed message, by component (smtp-source: our reaped child; bench: the polling).
    account = account_cpu(processes0, processes1, target.groups)
    cpu = dict(account.components)
    cpu.update({"smtp-source": children1 - children0, "bench": self1 - self0})
    tick = os.sysconf("SC_CLK_TCK")
    cpu.update(
        {
            "kernel_threads": account.kernel_threads,
            "interrupts": spent["interrupts"] / tick,
            "steal": spent["steal"] / tick,
            "foreign": account.foreign,
        }
    )
    # The rest of the machine's busy time: processes that came and went unseen, rounding of the tick counts.
    machine_busy = spent["busy"] / tick
    cpu["unaccounted"] = max(0.0, machine_busy - sum(cpu.values()))
    if account.foreign / leg.seconds > FOREIGN_CPU_LIMIT:
        share = account.foreign / leg.seconds
        foreign |= {f"{share:.2f} cores of foreign load, mostly: {line}" for line in account.foreign_top}
    leg.extra["cpu_ms_per_msg"] = {name: round(1000 * value / args.messages, 3) for name, value in cpu.items()}
    leg.extra["cpu_cores"] = os.cpu_count()
    if foreign:
        leg.extra["disturbed_by"] = sorted(foreign)
    if source.returncode != 0:
        text = (out + err).decode(errors="replace").strip()
        leg.errors.append(f"smtp-source exited {source.returncode}: {text[-500:]}")

    # Postfix's side: its queue must drain completely (nothing deferred), then read what the maillog says.
    try:
        wait_until(lambda: not postfix.queue(), timeout=max(1.0, min(60.0, deadline - time.monotonic())),
                   what="Postfix queue empty", interval=0.1)  # fmt: skip
    except TimeoutError:
        left = postfix.queue()
        queues = sorted({entry["queue_name"] for entry in left})
        leg.errors.append(f"{len(left)} messages left in Postfix's queue ({', '.join(queues)})")
    time.sleep(0.3)  # let the count settle: a next hop delivering extra copies would show here
    leg.delivered = target.count() - baseline
    if leg.delivered != args.messages:
        leg.errors.append(f"{leg.delivered} messages delivered, expected exactly {args.messages}")
    read_maillog(postfix.maillog_text()[log_offset:], target.rcpt, args.messages, leg)
    if samples:
        busy = [s for s in samples if s]
        leg.postfix["lmtp_connections_max"] = max(samples)
        leg.postfix["lmtp_connections_mean"] = round(statistics.fmean(busy), 1) if busy else 0
    leg.postfix["concurrency_limit"] = postfix.postconf("default_destination_concurrency_limit")


def read_maillog(text: str, rcpt: str, messages: int, leg: Leg) -> None:
    """What Postfix logged for the timed part: deliveries, bounces, deferrals, rejects, warnings."""
    sent: list[re.Match[str]] = []
    other: dict[str, int] = {}
    for match in _DELIVERY_RE.finditer(text):
        if match["status"] == "sent" and match["rcpt"] == rcpt:
            sent.append(match)
        else:
            other[match["status"]] = other.get(match["status"], 0) + 1
    lines = text.splitlines()
    bounced = sum("status=bounced" in line for line in lines)
    deferred = sum("status=deferred" in line for line in lines)
    rejects = [line for line in lines if "NOQUEUE: reject" in line or " reject: " in line]
    warnings = [line for line in lines if re.search(r"\b(warning|error|fatal|panic):", line)]
    delays = [float(m["delay"]) for m in sent]
    phases = {key: [float(m[key]) for m in sent] for key in "abcd"}
    leg.postfix.update(
        {
            "sent": len(sent),
            "other_statuses": other,  # e.g. "deliverable": recipient verification probes (Dovecot leg)
            "bounced": bounced,
            "deferred": deferred,
            "rejects": len(rejects),
            "lmtp_processes": len({m["pid"] for m in sent}),
            "max_conn_use": max((int(m["conn_use"]) for m in sent if m["conn_use"]), default=1),
            "delay_s": quantiles(delays),
            # delays=a/b/c/d: before the queue manager, in it (waiting for a delivery slot), connection set-up,
            # transmission (the next hop's time for LMTP DATA and its answers).
            "delays_mean_s": {
                name: round(statistics.fmean(phases[key]), 4) if phases[key] else None
                for key, name in zip("abcd", ("before_qmgr", "in_qmgr", "connect", "transmit"), strict=True)
            },
            "warnings": summarize(warnings, key=log_key),
            "reject_lines": summarize(rejects, 3, key=log_key),
        }
    )
    if len(sent) != messages:
        leg.errors.append(f"maillog: {len(sent)} status=sent lines for <{rcpt}>, expected {messages}")
    if bounced:
        leg.errors.append(f"maillog: {bounced} status=bounced")
    if deferred:
        leg.errors.append(f"maillog: {deferred} status=deferred")
    if rejects:
        leg.errors.append(f"maillog: {len(rejects)} rejects, e.g. {rejects[0][-200:]}")


@contextlib.contextmanager
def gateway_next_hop(workdir: Path, redis: RedisServer) -> Iterator[Target]:
    """Redis, the gateway, its policy service, its milter and a Postfix configured with ``postfix-config``'s
    fragments.

    Exactly the production wiring of ``docs/postfix.md`` (and ``tests/test_postfix_e2e.py``): Postfix asks
    the policy service at RCPT, the milter at the end of DATA, and hands mail to the gateway's own
    ``gitlab-lmtp`` transport.
    """
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    lmtp_port, policy_port, milter_port = sorted(ports)
    config = workdir / "gateway.yml"
    config.write_text(
        GATEWAY_CONFIG.format(
            domain=DOMAIN,
            lmtp_port=lmtp_port,
            policy_port=policy_port,
            milter_port=milter_port,
            spool=workdir / "spool",
            redis_url=redis.url,
        )
    )
    command = [gateway_script()]  # the venv's: the package installed editable, i.e. the working tree's gateway
    gateway = start_process(
        [*command, "serve", "--config", str(config), "--log-level", "warning"],
        cwd=workdir,
        output=workdir / "gateway.log",
    )
    policy = milter = postfix = None
    try:
        wait_until(lambda: greets(lmtp_port), timeout=30, what="lmtp-gateway", proc=gateway,
                   log_files=[workdir / "gateway.log"])  # fmt: skip
        policy = start_process(
            [*command, "policy", "--config", str(config)], cwd=workdir, output=workdir / "policy.log"
        )
        wait_until(lambda: port_open(policy_port), timeout=30, what="policy service", proc=policy,
                   log_files=[workdir / "policy.log"])  # fmt: skip
        milter = start_process(
            [*command, "milter", "--config", str(config)], cwd=workdir, output=workdir / "milter.log"
        )
        wait_until(lambda: port_open(milter_port), timeout=30, what="milter", proc=milter,
                   log_files=[workdir / "milter.log"])  # fmt: skip
        postfix = postfix_for_gateway(command, config, [DOMAIN], lmtp_port, workdir).start()
        transport = postfix.postconf("transport_maps")
        if f"gitlab-lmtp:inet:127.0.0.1:{lmtp_port}" not in transport:
            raise RuntimeError(f"Postfix does not route to the gateway: transport_maps = {transport}")

        def jobs() -> int:
            length = redis.command("LLEN", QUEUE_KEY)
            assert isinstance(length, int)
            return length

        groups = {
            "postfix": postfix.pid,
            "gateway": gateway.pid,
            "policy": policy.pid,
            "milter": milter.pid,
            "redis": redis.pid,
        }
        yield Target("lmtp-gateway", GATEWAY_RCPT, lmtp_port, jobs, postfix, {k: v for k, v in groups.items() if v})
    finally:
        if postfix is not None:
            with contextlib.suppress(OSError):
                (workdir / "maillog").write_text(postfix.maillog_text())  # kept for a post-mortem
            postfix.stop()
        for helper in (policy, milter):
            if helper is not None:
                stop_process(helper)
        if not process_running(gateway):
            with contextlib.suppress(OSError):
                tail = (workdir / "gateway.log").read_text(errors="replace")[-2000:]
                print(f"lmtp-gateway exited early:\n{tail}", file=sys.stderr)
        stop_process(gateway)


@contextlib.contextmanager
def dovecot_next_hop(workdir: Path) -> Iterator[Target]:
    """Dovecot's LMTP behind a PostfixServer with its defaults (recipient verification at RCPT)."""
    dovecot = DovecotServer().start()
    postfix = None
    try:
        postfix = PostfixServer([DOMAIN], lmtp_next_hop(dovecot.lmtp_port)).start()
        maildir = dovecot.maildir()

        def files() -> int:
            # Dovecot's LMTP saves to new/; cur/ is counted too so that a change there cannot hide mail.
            return sum(len(os.listdir(maildir / sub)) for sub in ("new", "cur"))

        groups = {"postfix": postfix.pid, "dovecot": dovecot.pid}
        yield Target("dovecot", DOVECOT_RCPT, dovecot.lmtp_port, files, postfix, {k: v for k, v in groups.items() if v})
    finally:
        if postfix is not None:
            with contextlib.suppress(OSError):
                (workdir / "maillog").write_text(postfix.maillog_text())
            postfix.stop()
        dovecot.stop(graceful=False)


def check_gateway(redis: RedisServer, spool: Path, expected: int, leg: Leg) -> None:
    """Every job an EmailReceiverWorker with its own jid, and the journal agreeing: nothing lost or doubled."""
    jobs = queued_jobs(redis)
    length = len(jobs)
    jids = {job.get("jid") for job in jobs}
    wrong_class = sum(job.get("class") != WORKER for job in jobs)
    contents = read_journal(spool)  # every worker's shard
    journal = contents.counts
    leg.extra.update(jobs=length, distinct_jids=len(jids), journal=journal, journal_shards=contents.per_shard)
    if len(jids) != expected or length != expected:
        leg.errors.append(f"{length} jobs with {len(jids)} distinct jids, expected {expected} (warm-up included)")
    if wrong_class:
        leg.errors.append(f"{wrong_class} jobs are not {WORKER}")
    waiting = journal["pending"] + journal.get("deferred", 0)
    if journal["delivered"] != expected or waiting or journal["failed"] or contents.distinct_ids != contents.entries:
        leg.errors.append(f"journal {journal}, expected {expected} delivered and nothing else")


def gateway_log_problems(path: Path) -> list[str]:
    """Whatever the gateway logged at --log-level warning, apart from its start-up line."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return summarize([line for line in lines if line.strip() and "listening on" not in line], key=log_key)


def bench(name: str, workroot: Path, args: argparse.Namespace, smtp_source_bin: str) -> Leg:
    """Set up one next hop from scratch, run its leg, check it, tear everything down (also on failure)."""
    leg = Leg(name, args.messages, args.sessions, args.size)
    workdir = workroot / name
    workdir.mkdir()
    redis: RedisServer | None = None
    try:
        if name == "lmtp-gateway":
            redis = RedisServer().start()
            with gateway_next_hop(workdir, redis) as target:
                run_leg(target, args, leg, smtp_source_bin)
            check_gateway(redis, workdir / "spool", args.messages + 1, leg)
            problems = gateway_log_problems(workdir / "gateway.log")
            if problems:
                leg.extra["gateway_log"] = problems
        else:
            with dovecot_next_hop(workdir) as target:
                run_leg(target, args, leg, smtp_source_bin)
    except LegTimeout as exc:
        leg.errors.append(f"aborted: {exc}")
    except Exception as exc:  # a broken leg is reported and the other leg still runs
        leg.errors.append(f"failed: {type(exc).__name__}: {str(exc)[-1500:]}")
    finally:
        if redis is not None:
            redis.stop()
    leg.ok = not leg.errors and leg.seconds is not None
    return leg


# --- driver ----------------------------------------------------------------------------------------------------


def wait_for_quiet_machine(max_wait: float, interval: float = 30.0) -> None:
    """Wait (up to ``max_wait`` seconds) until no other benchmark or test run is on the machine."""
    deadline = time.monotonic() + max_wait
    while running := sorted(foreign_load()):
        if time.monotonic() >= deadline:
            raise SystemExit(f"another benchmark is still running after {max_wait:.0f}s: {running[0]}")
        print(f"waiting for another benchmark to finish: {running[0][:120]}", file=sys.stderr, flush=True)
        time.sleep(interval)


def print_table(legs: list[Leg], ratio: float | None) -> None:
    """One line per leg: the speed, how the work split between Postfix and the next hop, and the checks."""
    print()
    header = (
        f"{'next hop':<13} {'msgs':>5} {'sess':>4} {'seconds':>8} {'msgs/s':>8} {'accept s':>8} "
        f"{'conn max':>8} {'conn avg':>8} {'delay p50':>9} {'in_qmgr':>8} {'transmit':>8} {'cpu busy':>8} "
        f"{'iowait':>6}  check"
    )
    print(header)
    print("-" * len(header))
    for leg in legs:
        pf = leg.postfix
        delays = pf.get("delays_mean_s", {})
        print(
            f"{leg.next_hop:<13} {leg.messages:>5} {leg.sessions:>4} {fmt(leg.seconds, '.2f'):>8} "
            f"{fmt(leg.msgs_per_s, '.1f'):>8} {fmt(leg.accept_seconds, '.2f'):>8} "
            f"{pf.get('lmtp_connections_max', '-'):>8} {pf.get('lmtp_connections_mean', '-'):>8} "
            f"{fmt(pf.get('delay_s', {}).get('p50'), '.2f'):>9} {fmt(delays.get('in_qmgr'), '.3f'):>8} "
            f"{fmt(delays.get('transmit'), '.3f'):>8} {fmt(leg.extra.get('machine_cpu_busy'), '.0%'):>8} "
            f"{fmt(leg.extra.get('machine_cpu_iowait'), '.0%'):>6}  "
            f"{'ok' if leg.ok else 'FAILED'}"
        )
    for leg in legs:
        cpu = leg.extra.get("cpu_ms_per_msg")
        if cpu:
            parts = ", ".join(f"{name} {value:.2f}" for name, value in cpu.items())
            print(f"  {leg.next_hop} CPU ms per message: {parts} (total {sum(cpu.values()):.2f})")
    for leg in legs:
        for error in leg.errors:
            print(f"  {leg.next_hop}: {error}")
        for warning in leg.postfix.get("warnings", []):
            print(f"  {leg.next_hop} maillog: {warning}")
        for line in leg.extra.get("disturbed_by", []):
            print(f"  {leg.next_hop}: NOT ALONE on the machine during the timed phase: {line}")
        for line in leg.extra.get("gateway_log", []):
            print(f"  {leg.next_hop} log: {line}")
    print()
    if ratio is None:
        print("ratio gateway/dovecot: - (a leg failed)")
    else:
        verdict = "the gateway is not the bottleneck" if ratio >= 1.0 else "the gateway is SLOWER than Dovecot"
        print(f"ratio gateway/dovecot: {ratio:.2f}  ({verdict})")


def run_round(order: list[str], args: argparse.Namespace, smtp_source_bin: str) -> list[Leg]:
    """Both legs one after the other, each on fresh servers; the work directory goes unless ``--keep``."""
    workroot = Path(tempfile.mkdtemp(prefix="postfix-bench-"))
    legs: list[Leg] = []
    try:
        for name in order:
            print(f"{name}: {args.messages} messages of {args.size} bytes, {args.sessions} SMTP sessions ...",
                  file=sys.stderr, flush=True)  # fmt: skip
            legs.append(bench(name, workroot, args, smtp_source_bin))
    finally:
        if args.keep:
            print(f"work directory kept: {workroot}", file=sys.stderr)
        else:
            shutil.rmtree(workroot, ignore_errors=True)
    return legs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="timed messages per leg (default 2000)")
    parser.add_argument("--sessions", type=int, default=16, help="parallel smtp-source sessions (default 16)")
    parser.add_argument("--size", type=int, default=10240, help="message size in bytes (default 10240)")
    parser.add_argument("--leg-timeout", type=float, default=300.0, help="abort a leg after this many seconds")
    parser.add_argument("--order", default="gateway,dovecot", help="leg order, e.g. dovecot,gateway")
    parser.add_argument("--wait-other", type=float, default=1200.0,
                        help="wait this long for another running benchmark to end (default 1200 s)")  # fmt: skip
    parser.add_argument("--retries", type=int, default=2,
                        help="measure again (after waiting for quiet) when another benchmark or test run "
                        "shared the machine (default 2)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=DEFAULT_RESULTS, help="results JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (maillogs, gateway log)")
    parser.add_argument("--scratch", choices=CHOICES, default="auto", help=SCRATCH_HELP)
    args = parser.parse_args(argv)
    if args.messages < 1 or args.sessions < 1 or args.size < 1:
        parser.error("--messages, --sessions and --size must be positive")
    names = {"gateway": "lmtp-gateway", "lmtp-gateway": "lmtp-gateway", "dovecot": "dovecot"}
    try:
        order = [names[part.strip()] for part in args.order.split(",")]
    except KeyError as exc:
        parser.error(f"--order: unknown leg {exc}")
    if sorted(order) != ["dovecot", "lmtp-gateway"]:
        parser.error("--order must name both legs once")
    if os.geteuid() != 0:
        raise SystemExit("run as root: Postfix's master switches to the postfix user")
    smtp_source_bin = require_binary("smtp-source", "postfix")
    require_binary("openssl", "openssl")

    return measure_on_scratch(
        args.scratch, lambda scratch: measure(args, order, smtp_source_bin, scratch), "spools, queues and Maildirs"
    )


def measure(args: argparse.Namespace, order: list[str], smtp_source_bin: str, scratch: str) -> int:
    attempts = 0
    while True:
        attempts += 1
        wait_for_quiet_machine(args.wait_other)
        legs = run_round(order, args, smtp_source_bin)
        disturbed = [leg.next_hop for leg in legs if leg.extra.get("disturbed_by")]
        if not disturbed or attempts > args.retries:
            break
        for leg in legs:
            for line in leg.extra.get("disturbed_by", []):
                print(f"{leg.next_hop} shared the machine with: {line}", file=sys.stderr)
        print("measuring again", file=sys.stderr, flush=True)

    by_name = {leg.next_hop: leg for leg in legs}
    gw, dc = by_name["lmtp-gateway"], by_name["dovecot"]
    ratio = gw.msgs_per_s / dc.msgs_per_s if gw.ok and dc.ok and gw.msgs_per_s and dc.msgs_per_s else None
    print_table([by_name[n] for n in ("lmtp-gateway", "dovecot")], ratio)
    results = {
        "benchmark": "postfix end to end: smtp-source -> Postfix (SMTP) -> LMTP next hop -> delivered",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "tmpdir": tempfile.gettempdir(),
            "scratch": scratch,
        },
        "versions": versions(),
        "gateway_code": {"commit": git_head(), "digest": code_digest(REPO)},
        "parameters": {
            "messages": args.messages,
            "sessions": args.sessions,
            "size": args.size,
            "order": order,
            "warm_up_messages": 1,
            "poll_interval_s": POLL_INTERVAL,
        },
        "attempts": attempts,
        "legs": [asdict(leg) for leg in legs],
        "ratio_gateway_dovecot": ratio,
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.output}")
    return 0 if ratio is not None else 1


if __name__ == "__main__":
    sys.exit(main())
