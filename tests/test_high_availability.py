"""Two gateway hosts behind one Postfix: each a real `lmtp-gateway serve` with its own journal, both pushing into
one real Redis, and a real Postfix whose LMTP next hop is one DNS name with two A records.

Why a DNS name as the next hop rather than `lmtp_fallback_relay` alone: Postfix's LMTP client looks the name up (A
records only: MX lookups do not apply to LMTP) and tries its addresses in random order
(`lmtp_randomize_addresses = yes`), so both hosts carry mail and either may die; when a connection to one is
refused or breaks, it tries the next address within the same delivery. A fallback relay carries nothing while the
next hop answers, and each delivery tries the next hop first. The fallback relays are set as well, to the hosts'
addresses, for one case the name cannot cover: a name the DNS does not know (NXDOMAIN) is a destination that does
not exist, and Postfix returns such mail to its sender; with fallback relays it tries them instead.

The name is served by a real dnsmasq. Postfix's resolver takes its server from /etc/resolv.conf, which has no
port: dnsmasq listens on port 53 of a loopback address of its own, and Postfix's daemons read a resolv.conf naming
it, bind-mounted over /etc/resolv.conf in a mount namespace of Postfix's own (the machine's file is untouched).
The two hosts are 127.0.0.1 and 127.0.0.3 (all of 127/8 reaches the loopback interface), on the same port.

1. Under load, one host is killed (SIGKILL). Postfix hands what was in flight to it, and all that follows, to the
   other host; the queue drains; nothing bounces. When the host comes back, its journal delivers what it had
   acknowledged and not pushed yet. Every message Postfix accepted is exactly one Sidekiq job.
2. The runbook for a host that never comes back: it is killed while Redis stalls (SIGSTOP), so its journal keeps
   mail it acknowledged and did not deliver, some of it already pushed into the stalled Redis (which runs those
   pushes when it wakes). Its journal is carried to the surviving host and delivered there with
   `lmtp-gateway replay`, while the survivor keeps running. Every message is still exactly one job: the dedupe key
   in Redis turns the pushes already made into no-ops.
3. The name gone from DNS: without fallback relays Postfix bounces; with them, the hosts' addresses take the mail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from lmtp_gateway.journal import Entry, Journal, State
from tests.conftest import REPLY_RCPT, draft, gateway_yaml, lmtp_gateway_command, numbered_message, under_ci
from tests.servers import free_port, require_binary, wait_until
from tests.servers.dnsmasq import DnsmasqServer, resolver_address
from tests.servers.postfix import PostfixServer
from tests.servers.redis import RedisServer

DOMAIN = "incoming.test"
LMTP_NAME = f"lmtp.{DOMAIN}"  # the next hop: one name, an A record per gateway host
TRANSPORT = "gitlab-lmtp"  # the LMTP transport `lmtp-gateway postfix-config` names
HOST_A = "127.0.0.1"  # the host that dies
HOST_B = "127.0.0.3"  # the survivor
SENDER = "alice@example.org"
CLIENTS = 4  # SMTP clients sending at once
# The states an entry waits in before it is delivered (`deferred` once a first attempt failed, where the journal has
# that state): what a carried journal still holds for GitLab.
WAITING_STATES = tuple(state.value for state in State if state.value in ("pending", "deferred"))
FINISHED_STATES = ("delivered", "dropped", "failed")


def gitlab_lmtp_service(*gateways: HostGateway) -> str:
    """The master.cf entry of the LMTP transport, as docs/high-availability.md shows it: a host that does not
    answer is given up after 5 s (the system's own limit is about two minutes), and should the name ever be
    missing from DNS, the hosts' addresses are tried in turn instead of the mail being returned to its sender."""
    fallback = ",".join(f"{gateway.host}:{gateway.port}" for gateway in gateways)
    return (
        f"{TRANSPORT} unix  -       -       n       -       -       lmtp\n"
        "  -o lmtp_connect_timeout=5s\n"
        f"  -o lmtp_fallback_relay={fallback}\n"
    )


def _precondition(problem: str) -> None:
    """A set-up this machine cannot give: a failure under CI (it would hide a broken image), else a skip."""
    if under_ci():
        pytest.fail(problem)
    pytest.skip(problem)


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def shared_port() -> int:
    """A port free on both hosts' addresses: the DNS name carries addresses only, the port is the next hop's."""
    for _ in range(20):
        port = free_port()
        if _bindable(HOST_B, port):
            return port
    raise AssertionError(f"no port free on both {HOST_A} and {HOST_B}")


def metadata_files(spool: Path, states: tuple[str, ...]) -> list[Path]:
    """The .json of every entry in `states` under `spool`: its own directories and any worker's shard-N/."""
    return [
        path for state in states for path in (*spool.glob(f"{state}/*.json"), *spool.glob(f"shard-*/{state}/*.json"))
    ]


class HostGateway:
    """`lmtp-gateway serve` as one gateway host: its own address, configuration, journal (spool.path) and log."""

    def __init__(self, host: str, port: int, directory: Path, redis: RedisServer) -> None:
        directory.mkdir()
        self.host = host
        self.port = port
        self.spool = directory / "spool"
        self.config_path = directory / "gateway.yml"
        self.log_path = directory / "gateway.log"
        sidekiq = {"delivery_method": "sidekiq"}
        config = gateway_yaml(
            self.spool,
            incoming_email=sidekiq,
            service_desk_email=sidekiq,
            redis={"url": redis.url},
            lmtp={"listen": f"{host}:{port}"},
        )
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> HostGateway:
        argv = [*lmtp_gateway_command(), "serve", "--config", str(self.config_path), "--log-json"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log)
        try:
            wait_until(
                self._greets, timeout=60, what=f"gateway on {self.host}:{self.port}", proc=self.process,
                log_files=[self.log_path],
            )  # fmt: skip
        except BaseException:
            self.kill()
            raise
        return self

    def _greets(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=1) as probe:
            return probe.recv(100).startswith(b"220")
        return False

    def kill(self) -> None:
        """SIGKILL: the host is gone, mid-transaction or not."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def terminate(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def entry_files(self, *states: str) -> list[Path]:
        """The metadata files of the journal's entries in `states` (every state when none is given)."""
        return metadata_files(self.spool, states or (*WAITING_STATES, *FINISHED_STATES))

    def count(self, *states: str) -> int:
        return len(self.entry_files(*states))

    def waiting(self) -> int:
        return self.count(*WAITING_STATES)

    def attempted_while_waiting(self) -> int:
        """Entries still waiting whose push was tried: sent to Redis, no answer seen."""
        attempted = 0
        for path in self.entry_files(*WAITING_STATES):
            with contextlib.suppress(OSError, ValueError):  # moved on, or being rewritten, meanwhile
                attempted += json.loads(path.read_bytes()).get("attempts", 0) > 0
        return attempted


@dataclass
class Load:
    """SMTP clients sending numbered messages into Postfix on its port until told to stop."""

    postfix: PostfixServer
    accepted: dict[int, str] = field(default_factory=dict)  # message number -> Postfix's queue id
    uncertain: set[int] = field(default_factory=set)  # a connection broke mid-transaction
    refused: list[tuple[int | None, int | None, str]] = field(default_factory=list)  # number, SMTP code, what
    stop: threading.Event = field(default_factory=threading.Event)
    _numbers: Iterator[int] = field(default_factory=lambda: iter(range(10**9)))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _next(self) -> int:
        with self._lock:
            return next(self._numbers)

    def client(self) -> None:
        while not self.stop.is_set():
            number = None
            try:
                with smtplib.SMTP(self.postfix.host, self.postfix.port, timeout=60) as smtp:
                    smtp.ehlo("sender.example.org")
                    while not self.stop.is_set():
                        number = self._next()
                        self._send(smtp, number)
                        number = None
            except (smtplib.SMTPException, OSError) as error:
                self.refused.append((number, getattr(error, "smtp_code", None), repr(error)))
                if number is not None:
                    self.uncertain.add(number)

    def _send(self, smtp: smtplib.SMTP, number: int) -> None:
        code, reply = smtp.mail(SENDER)
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, reply, SENDER)
        code, reply = smtp.rcpt(REPLY_RCPT)
        if code != 250:
            self.refused.append((number, code, f"RCPT {reply.decode(errors='replace')}"))
            smtp.rset()
            return
        code, reply = smtp.data(numbered_message(number))
        queued = re.search(rb"queued as (\w+)", reply)
        if code == 250 and queued:
            self.accepted[number] = queued.group(1).decode()
        else:
            self.refused.append((number, code, f"DATA {reply.decode(errors='replace')}"))


@contextlib.contextmanager
def load_on(postfix: PostfixServer) -> Iterator[Load]:
    """Several SMTP clients sending until the block ends; they have all finished when it has."""
    load = Load(postfix)
    threads = [threading.Thread(target=load.client, name=f"smtp-client-{n}", daemon=True) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        yield load
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(90)
        assert not any(thread.is_alive() for thread in threads), "an SMTP client did not finish"
    assert not [refusal for refusal in load.refused if (refusal[1] or 0) >= 500], load.refused
    assert len(load.accepted) > 100, "the load was too small to mean anything"


@dataclass
class TwoHosts:
    postfix: PostfixServer
    redis: RedisServer
    dns: DnsmasqServer
    a: HostGateway
    b: HostGateway

    def jobs(self) -> Counter[int]:
        """Sidekiq jobs in Redis, counted by the number in their message's Subject."""
        raw_jobs = self.redis.command("LRANGE", "queue:default", "0", "-1")
        assert isinstance(raw_jobs, list)
        found: Counter[int] = Counter()
        for raw in raw_jobs:
            assert isinstance(raw, bytes)
            (message,) = json.loads(raw)["args"]
            subject = re.search(r"^Subject: message (\d+)\r?$", message, re.MULTILINE)
            assert subject, message[:500]
            found[int(subject.group(1))] += 1
        return found

    def statuses(self, gateway: HostGateway, status: str) -> set[str]:
        """Queue ids of the messages Postfix's LMTP client logged with `status` for `gateway`'s address."""
        relay = rf"relay={re.escape(LMTP_NAME)}\[{re.escape(gateway.host)}\]:{gateway.port}"
        line = re.compile(rf"postfix/lmtp\[\d+\]: (\w+): to=<[^>]*>, {relay}, .*\bstatus={status}\b")
        return {match.group(1) for match in line.finditer(self.postfix.maillog_text())}

    def cut_short(self, gateway: HostGateway) -> set[str]:
        """Queue ids of the messages whose LMTP session with `gateway` broke (its process died)."""
        line = re.compile(rf": (\w+): lost connection with {re.escape(LMTP_NAME)}\[{re.escape(gateway.host)}\]")
        return {match.group(1) for match in line.finditer(self.postfix.maillog_text())}

    def drain(self, timeout: float = 120) -> None:
        """Until Postfix's queue is empty, asking it to retry deferred mail now rather than after its backoff."""

        def empty() -> bool:
            if not self.postfix.queue():
                return True
            self.postfix.flush()
            return False

        wait_until(empty, timeout=timeout, what="Postfix's queue drained", log_files=[self.postfix.maillog], interval=1)

    def wait_all_delivered(self, wanted: set[int], *running: HostGateway, timeout: float = 120) -> Counter[int]:
        """Until every message in `wanted` is a job and the `running` gateways' journals hold nothing to deliver;
        then the jobs by message number."""
        found: Counter[int] = Counter()

        def done() -> bool:
            found.clear()
            found.update(self.jobs())
            return wanted <= set(found) and not any(gateway.waiting() for gateway in running)

        wait_until(done, timeout=timeout, what="every accepted message in Redis", interval=0.2,
                   log_files=[gateway.log_path for gateway in running])  # fmt: skip
        return found

    def assert_exactly_once(self, load: Load, jobs: Counter[int]) -> None:
        lost = set(load.accepted) - set(jobs)
        assert not lost, f"accepted by Postfix, no job: {sorted(lost)[:20]}"
        doubled = {number: count for number, count in jobs.items() if count > 1}
        assert not doubled, f"more than one job: {doubled}"
        strays = set(jobs) - set(load.accepted) - load.uncertain
        assert not strays, f"jobs for messages Postfix never accepted: {sorted(strays)[:20]}"

    def assert_nothing_bounced(self) -> None:
        assert not self.postfix.bounces(), self.postfix.bounces()
        assert "status=bounced" not in self.postfix.maillog_text()


@pytest.fixture
def nameserver() -> str:
    """A loopback address whose port 53 a DNS server for Postfix can take, once this machine can run the set-up."""
    require_binary("postconf", "postfix")
    require_binary("dnsmasq", "dnsmasq-base")
    unshare = require_binary("unshare", "util-linux")
    require_binary("mount", "mount")
    if os.geteuid() != 0:  # as for every test with a PostfixServer
        pytest.skip("needs root: Postfix's master, a DNS server on port 53 and a mount namespace for Postfix")
    namespace = subprocess.run([unshare, "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    if namespace.returncode != 0:
        _precondition(f"no mount namespace here (needs CAP_SYS_ADMIN): {namespace.stderr.strip()}")
    address = resolver_address()
    if address is None:
        _precondition("no loopback address with port 53 free for the DNS server")
    assert address is not None
    return address


@pytest.fixture
def two_hosts(tmp_path: Path, redis: RedisServer, nameserver: str) -> Iterator[TwoHosts]:
    port = shared_port()
    with contextlib.ExitStack() as cleanup:
        dns = DnsmasqServer(host_records={LMTP_NAME: [HOST_A, HOST_B]}, host=nameserver, port=53).start()
        cleanup.callback(dns.stop)
        a = HostGateway(HOST_A, port, tmp_path / "host-a", redis)
        b = HostGateway(HOST_B, port, tmp_path / "host-b", redis)
        for gateway in (a, b):
            cleanup.callback(gateway.kill)
            gateway.start()
        postfix = PostfixServer(
            [DOMAIN],
            f"{TRANSPORT}:inet:{LMTP_NAME}:{port}",
            resolv_conf=dns.resolv_conf,
            extra_master_cf=gitlab_lmtp_service(a, b),
        )
        cleanup.callback(postfix.stop)
        # kept for a failed test's post-mortem (the Postfix instance's own directory goes with it)
        cleanup.callback(lambda: (tmp_path / "maillog").write_text(postfix.maillog_text()))
        postfix.start()
        yield TwoHosts(postfix, redis, dns, a, b)


def test_a_host_killed_under_load_postfix_delivers_to_the_other_and_nothing_bounces(two_hosts: TwoHosts) -> None:
    a, b = two_hosts.a, two_hosts.b
    with load_on(two_hosts.postfix) as load:
        wait_until(lambda: a.count() >= 20 and b.count() >= 20, timeout=120, what="both hosts taking mail")
        a.kill()
        taken_by_b = b.count()
        wait_until(lambda: b.count() >= taken_by_b + 80, timeout=120, what="the survivor taking the mail alone")
    two_hosts.drain()  # with `postqueue -f`: whatever was deferred is retried now, not after Postfix's backoff
    sent_by_a, sent_by_b = two_hosts.statuses(a, "sent"), two_hosts.statuses(b, "sent")
    assert sent_by_a and sent_by_b, "Postfix did not use both addresses of the name"
    assert set(load.accepted.values()) <= sent_by_a | sent_by_b  # every accepted message handed over, by LMTP
    # A transfer the kill cut short (`lost connection ... message may be sent more than once`) and anything deferred
    # went to the survivor: the dead host may have journaled such a message, and the Redis dedupe key must hold.
    for queue_id in two_hosts.cut_short(a) | two_hosts.statuses(a, "deferred") | two_hosts.statuses(b, "deferred"):
        assert queue_id in sent_by_b, f"{queue_id}: cut short or deferred, then not delivered to the survivor"
    two_hosts.assert_nothing_bounced()

    a.start()  # the host comes back: its journal delivers what it acknowledged and had not pushed yet
    jobs = two_hosts.wait_all_delivered(set(load.accepted), a, b)
    two_hosts.assert_exactly_once(load, jobs)
    assert a.terminate() == 0 and b.terminate() == 0


def test_runbook_a_host_that_never_comes_back_its_journal_replayed_on_the_survivor(
    two_hosts: TwoHosts, tmp_path: Path
) -> None:
    a, b, redis = two_hosts.a, two_hosts.b, two_hosts.redis
    assert redis.pid is not None
    with load_on(two_hosts.postfix) as load:
        wait_until(
            lambda: a.count("delivered") >= 15 and b.count("delivered") >= 15, timeout=120, what="both hosts delivering"
        )
        os.kill(redis.pid, signal.SIGSTOP)  # Redis stalls: pushes are sent, no answer comes
        try:
            before = a.count()
            wait_until(
                lambda: a.attempted_while_waiting() >= 1 and a.count() >= before + 20,
                timeout=120,
                what="the host acknowledging mail while its pushes into the stalled Redis time out",
            )
            a.kill()  # and it never comes back
            taken_by_b = b.count()
            wait_until(lambda: b.count() >= taken_by_b + 40, timeout=120, what="the survivor taking the mail alone")
        finally:
            os.kill(redis.pid, signal.SIGCONT)  # Redis runs the pushes it had received, the dead host's too
    two_hosts.drain()
    wait_until(lambda: not b.waiting(), timeout=120, what="the survivor's own backlog delivered", interval=0.2)
    sent_by_a = two_hosts.statuses(a, "sent")
    acknowledged_by_a = {number for number, queue_id in load.accepted.items() if queue_id in sent_by_a}
    assert acknowledged_by_a
    assert a.waiting(), "the dead host's journal holds nothing to carry: the test proves nothing"

    # The runbook: carry the dead host's journal to the survivor, into a directory of its own, and deliver it
    # there with the survivor's configuration, while the survivor's own gateway keeps running.
    carried = tmp_path / "carried"
    subprocess.run(["cp", "-a", str(a.spool), str(carried)], check=True)
    waiting_ids = {path.stem for path in metadata_files(carried, WAITING_STATES)}
    set_aside_before = {path.stem for path in metadata_files(carried, ("quarantine",))}
    states = [argument for state in WAITING_STATES for argument in ("--state", state)]
    command = [*lmtp_gateway_command(), "replay", "--config", str(b.config_path), "--spool", str(carried), *states]
    replay = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert b.process is not None and b.process.poll() is None, "the survivor stopped"
    lines = [line.split(None, 2) for line in replay.stdout.splitlines()]
    assert {line[0] for line in lines} == waiting_ids  # one line per entry: its id, what happened, and how
    # A commit the kill cut short before its flush (never answered 250: Postfix sent it again) is set aside.
    torn = {path.stem for path in metadata_files(carried, ("quarantine",))} - set_aside_before
    assert {line[0] for line in lines if line[1] == "damaged"} == torn, replay.stdout
    assert {line[1] for line in lines if line[0] not in torn} == {"delivered"}, replay.stdout
    assert any(line[2] == "already in Redis (dedupe)" for line in lines), replay.stdout  # pushed before it died
    assert f"journal: {carried}" in replay.stderr
    delivered = len(waiting_ids) - len(torn)
    summary = f"{len(torn)} damaged, {delivered} delivered" if torn else f"{delivered} delivered"
    assert f"{len(waiting_ids)} processed: {summary}" in replay.stderr
    assert replay.returncode == (1 if torn else 0), f"{replay.stdout}\n{replay.stderr}"

    stats = subprocess.run(
        [*lmtp_gateway_command(), "spool", "stats", "--config", str(b.config_path), "--spool", str(carried), "--json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    counts = json.loads(stats.stdout)
    assert all(counts[state] == 0 for state in WAITING_STATES), counts

    jobs = two_hosts.wait_all_delivered(set(load.accepted), b)
    assert acknowledged_by_a <= set(jobs)
    two_hosts.assert_exactly_once(load, jobs)
    two_hosts.assert_nothing_bounced()
    assert b.terminate() == 0


def test_the_name_gone_from_dns_the_fallback_relays_deliver_and_nothing_bounces(two_hosts: TwoHosts) -> None:
    """A name the DNS answers NXDOMAIN for is, to Postfix, a destination that does not exist: without
    `lmtp_fallback_relay` the mail is returned to its sender (status=bounced, dsn=5.4.4). With the hosts' addresses
    as fallback relays it goes to the first that answers, here also after that one died."""
    a, b, postfix = two_hosts.a, two_hosts.b, two_hosts.postfix
    two_hosts.dns.stop()  # the same DNS server, without the name
    with DnsmasqServer(host=two_hosts.dns.host, port=53) as empty_dns:
        assert empty_dns.host == two_hosts.dns.host
        with smtplib.SMTP(postfix.host, postfix.port, timeout=60) as smtp:
            for number in range(10):
                smtp.sendmail(SENDER, [REPLY_RCPT], numbered_message(number))
            # the first fallback relay dies, once it has delivered what it took: the second takes over
            wait_until(lambda: not postfix.queue() and not a.waiting(), timeout=60, what="ten delivered")
            a.kill()
            for number in range(10, 20):
                smtp.sendmail(SENDER, [REPLY_RCPT], numbered_message(number))
        two_hosts.drain()
    log = postfix.maillog_text()
    via_a = re.findall(rf"relay={re.escape(HOST_A)}\[{re.escape(HOST_A)}\]:{a.port}, .*status=sent", log)
    via_b = re.findall(rf"relay={re.escape(HOST_B)}\[{re.escape(HOST_B)}\]:{b.port}, .*status=sent", log)
    assert len(via_a) >= 10 and len(via_b) >= 1, log[-3000:]  # the fallback form: an address, no name
    two_hosts.assert_nothing_bounced()
    jobs = two_hosts.wait_all_delivered(set(range(20)), b)
    assert set(jobs) == set(range(20)) and set(jobs.values()) == {1}


def test_without_fallback_relays_a_next_hop_missing_from_dns_bounces(nameserver: str) -> None:
    """Why the fallback relays are there: to Postfix, an LMTP next hop whose name does not exist is a permanent
    failure, and the mail goes back to its (perhaps forged) sender."""
    with DnsmasqServer(host=nameserver, port=53) as dns:
        # no recipient verification here: its probe would meet the same missing name and refuse the recipient
        no_probe = {"smtpd_recipient_restrictions": "reject_unauth_destination"}
        postfix = PostfixServer(
            [DOMAIN], f"lmtp:inet:{LMTP_NAME}:2424", resolv_conf=dns.resolv_conf, extra_main_cf=no_probe
        )
        with postfix:
            with smtplib.SMTP(postfix.host, postfix.port, timeout=60) as smtp:
                smtp.sendmail(SENDER, [REPLY_RCPT], numbered_message(1))
            postfix.wait_log(r"dsn=5\.4\.4, status=bounced \(Host or domain name not found", timeout=60)
            wait_until(postfix.bounces, timeout=60, what="the non-delivery notification")


@pytest.mark.parametrize("state", [state.value for state in State if state.value in ("deferred", "failed")])
async def test_replay_of_a_carried_journal_finds_a_message_where_the_crash_left_it(tmp_path: Path, state: str) -> None:
    """A state change renames the entry's .json first, then its .eml: a host killed in between leaves the metadata
    in the new state's directory and the message in pending/. `serve` puts that right when it starts; a journal
    carried from a host that never came back never had that start, and replay must deliver the entry, not set
    an acknowledged message aside as damaged."""
    spool = tmp_path / "carried"
    journal = Journal(spool)
    journal.open()
    entry = Entry(
        id="c" * 24, fingerprint="c" * 64, state=State.PENDING, received_at=1.0, ingress="lmtp", mail_from=SENDER,
        rcpt=REPLY_RCPT, mailbox="incoming_email", key=REPLY_RCPT.split("+")[1].split("@")[0], handler="create_note",
        source="to", reason="", size=len(numbered_message(7)),
    )  # fmt: skip
    await journal.commit([draft(entry, f"Delivered-To: {REPLY_RCPT}\r\n".encode(), numbered_message(7))])
    journal.close()
    os.replace(spool / "pending" / f"{entry.id}.json", spool / state / f"{entry.id}.json")  # the first rename only
    config = tmp_path / "gateway.yml"
    config.write_text(yaml.safe_dump(gateway_yaml(spool)))
    command = [*lmtp_gateway_command(), "replay", "--config", str(config), "--state", state]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"{entry.id}  delivered")
    assert "message file found in pending/, where an interrupted state change left it" in done.stderr
    (copy,) = (spool / "maildir" / "incoming_email" / "new").iterdir()
    assert copy.read_bytes().endswith(numbered_message(7))
    assert not list(spool.glob("quarantine/*")) and not list(spool.glob("pending/*"))
