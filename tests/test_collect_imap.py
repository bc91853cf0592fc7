"""`collect` against a real Dovecot over IMAP: backlog, IDLE, outages, kill -9, UIDVALIDITY, two collectors, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmtp_gateway.collectors import arbiter
from lmtp_gateway.collectors import imap as imap_collector
from lmtp_gateway.collectors.imap import ImapSettings
from lmtp_gateway.config import Config
from lmtp_gateway.errors import ConfigError
from lmtp_gateway.journal import Journal, State
from lmtp_gateway.service import Gateway
from tests.conftest import (
    StartGateway,
    eventually,
    gateway_yaml,
    lmtp_gateway_command,
    mailroom_secret_file,
    make_config,
    numbered_message,
)
from tests.gitlab_stub import GitLabStub
from tests.mailbox import Inspector, deliver, deliver_numbered
from tests.servers.dovecot import DovecotServer
from tests.test_sidekiq import jobs


@pytest.fixture
def dovecot() -> Iterator[DovecotServer]:
    with DovecotServer() as server:
        yield server


def imap_settings(dovecot: DovecotServer, **extra: Any) -> dict[str, Any]:
    settings = {
        "address": "incoming+%{key}@incoming.test",
        "host": dovecot.host,
        "port": dovecot.imap_port,
        "user": dovecot.user,
        "password": dovecot.password,
        "idle_timeout": 60,
        **extra,
    }
    if "inbox_options" in extra:  # XOAUTH2: an app token instead of a password
        del settings["password"]
    return settings


def collect_config(spool: Path, dovecot: DovecotServer, redis: Any, **extra: Any) -> Config:
    return make_config(
        spool,
        incoming_email={**imap_settings(dovecot, **extra), "delivery_method": "sidekiq"},
        service_desk_email=None,
        redis={"url": redis.url},
    )


def _number(raw: bytes) -> int:
    return int(re.search(rb"Subject: message (\d+)", raw)[1])


def subjects(redis: Any) -> Counter[int]:
    return Counter(_number(job["args"][0].encode()) for job in jobs(redis))


async def test_drains_a_backlog_once_and_marks_only_what_is_journaled(
    dovecot: DovecotServer, redis: Any, tmp_path: Path
) -> None:
    deliver_numbered(dovecot, range(300))
    gateway = Gateway(collect_config(tmp_path / "spool", dovecot, redis), listen=False, collect=True)
    report = await gateway.collect_once()
    assert report.errors == {} and report.collected == {"incoming_email": 300}
    assert report.delivered == 300 and report.pending == 0
    assert subjects(redis) == Counter(range(300))
    with Inspector(dovecot) as mailbox:
        flags = mailbox.flags()
    assert len(flags) == 300 and all({r"\Seen", r"\Deleted"} <= f for f in flags.values())  # GitLab's default
    journal = Journal(tmp_path / "spool")
    delivered = list(journal.entries(State.DELIVERED))
    assert len(delivered) == 300 and {e.ingress for e in delivered} == {"imap:incoming_email"}
    # a second run finds nothing new, and delivers nothing twice
    again = await Gateway(collect_config(tmp_path / "spool", dovecot, redis), listen=False, collect=True).collect_once()
    assert again.collected == {"incoming_email": 0} and len(jobs(redis)) == 300


async def test_delete_and_expunge_after_the_journal_has_it(dovecot: DovecotServer, redis: Any, tmp_path: Path) -> None:
    deliver_numbered(dovecot, range(5))
    config = collect_config(tmp_path / "spool", dovecot, redis, delete_after_delivery=True, expunge_deleted=True)
    report = await Gateway(config, listen=False, collect=True).collect_once()
    assert report.collected == {"incoming_email": 5}
    with Inspector(dovecot) as mailbox:
        assert mailbox.flags() == {}
    assert subjects(redis) == Counter(range(5))


async def test_a_message_arriving_while_idle_is_pushed_by_the_server(
    dovecot: DovecotServer, redis: Any, tmp_path: Path, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The IDLE the collector waits in brings the new message (not a poll, not an IDLE issued again later): with a
    minute's idle_timeout, the job is in Redis while the first IDLE is still the only one."""
    started = count_idles(monkeypatch)
    running = await start_gateway(collect_config(tmp_path / "spool", dovecot, redis), listen=False, collect=True)
    (collector,) = running.gateway.collectors
    await eventually(lambda: collector.status.state == "idle" and started, what="collector idling")
    deliver_numbered(dovecot, [7])
    await eventually(lambda: jobs(redis), what="the job")
    assert subjects(redis) == Counter([7])
    assert len(started) <= 2  # the IDLE that was pushed, and the one the collector went back to after it


def count_idles(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The timeout of every IDLE the collector starts, as it asks for it."""
    started: list[float] = []
    idle_start = imap_collector._Client.idle_start

    async def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        started.append(kwargs["timeout"])
        return await idle_start(self, *args, **kwargs)

    monkeypatch.setattr(imap_collector._Client, "idle_start", counting)
    return started


async def test_idle_is_issued_again_every_idle_timeout(
    dovecot: DovecotServer, redis: Any, tmp_path: Path, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Servers drop an IDLE left alone too long (RFC 2177: re-issue at least every 29 minutes); idle_timeout is
    how often the collector starts a fresh one, and mail still arrives after several."""
    started = count_idles(monkeypatch)
    config = collect_config(tmp_path / "spool", dovecot, redis, idle_timeout=1)
    running = await start_gateway(config, listen=False, collect=True)
    await eventually(lambda: len(started) >= 3, what="three IDLE commands")
    assert set(started) == {1}  # each IDLE asked to end after idle_timeout
    deliver_numbered(dovecot, [4])
    await eventually(lambda: jobs(redis), what="the job after the IDLEs")
    assert subjects(redis) == Counter([4])
    await running.stop()  # while idling: the IDLE is ended with DONE, so the LOGOUT is answered at once
    log = dovecot.log_path
    ends = await eventually(
        lambda: [line for line in log.read_text().splitlines() if "imap(" in line and "Disconnected" in line],
        what="the end of the IMAP session in Dovecot's log",
    )
    assert len(ends) == 1 and "Disconnected: Logged out" in ends[0]  # not "Connection closed (IDLE running ...)"


async def test_redis_down_leaves_mail_unread_on_the_server_then_delivers_it_once(
    dovecot: DovecotServer, redis: Any, tmp_path: Path, start_gateway: StartGateway
) -> None:
    deliver_numbered(dovecot, range(40))
    redis.stop()
    running = await start_gateway(
        collect_config(tmp_path / "spool", dovecot, redis), listen=False, collect=True, backoff_base=0.05
    )
    (collector,) = running.gateway.collectors
    await eventually(lambda: collector.status.last_error, what="the collector to report Redis down")
    assert "Redis" in collector.status.last_error
    with Inspector(dovecot) as mailbox:  # nothing claimed, nothing taken: all still unread on the server
        assert len(mailbox.unseen_subjects()) == 40
    redis.start()
    await eventually(lambda: len(jobs(redis)) == 40, timeout=30, what="40 jobs after Redis returned")
    assert subjects(redis) == Counter(range(40))
    with Inspector(dovecot) as mailbox:  # marked once the journal had them (delivery may come first)
        await eventually(lambda: not mailbox.unseen_subjects(), what="all marked read")


async def test_a_full_journal_disk_leaves_mail_unread_then_collects_it_once(
    dovecot: DovecotServer, redis: Any, small_disk: Path
) -> None:
    """The fetch must not mark anything read (BODY.PEEK[]): when the commit fails, the mail stays as it was."""
    config = collect_config(small_disk / "spool", dovecot, redis, delete_after_delivery=False)
    await Gateway(config, listen=False, collect=True).collect_once()  # the journal and the collector's state exist
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * (1 << 20))
    deliver_numbered(dovecot, range(10))
    report = await Gateway(config, listen=False, collect=True).collect_once()
    assert "disk full" in report.errors["incoming_email"]
    with Inspector(dovecot) as mailbox:
        assert len(mailbox.unseen_subjects()) == 10 and not any(mailbox.flags().values())
    assert not jobs(redis)
    filler.unlink()
    report = await Gateway(config, listen=False, collect=True).collect_once()
    assert report.errors == {} and report.collected == {"incoming_email": 10}
    assert subjects(redis) == Counter(range(10))
    with Inspector(dovecot) as mailbox:
        assert not mailbox.unseen_subjects()


async def test_sink_failing_keeps_each_message_unread_or_journaled_then_delivers_it_once(
    dovecot: DovecotServer, tmp_path: Path, start_gateway: StartGateway
) -> None:
    key = b"k" * 32
    secret = mailroom_secret_file(tmp_path, key)
    gitlab = GitLabStub(key, scripted=[502] * 30).start()
    try:
        deliver_numbered(dovecot, range(20))
        config = make_config(
            tmp_path / "spool",
            gitlab={"url": gitlab.url},
            incoming_email={**imap_settings(dovecot), "delivery_method": "webhook", "secret_file": str(secret)},
            service_desk_email=None,
        )
        running = await start_gateway(config, listen=False, collect=True, backoff_base=0.05)
        dispatcher = running.gateway.dispatcher
        await eventually(lambda: dispatcher.stats.transient >= 20, what="failed deliveries")
        journal = running.gateway.journal
        journaled = {
            _number(journal.read_message(e)) for e in journal.entries(State.PENDING, State.DEFERRED, State.DELIVERED)
        }
        with Inspector(dovecot) as mailbox:
            unread = {int(subject.split()[1]) for subject in mailbox.unseen_subjects()}
        assert journaled | unread == set(range(20))  # each one unread on the server or safe in the journal
        await eventually(lambda: len(gitlab.received) == 20, timeout=30, what="20 webhook deliveries")
        assert Counter(_number(r.body) for r in gitlab.received) == Counter(range(20))
    finally:
        gitlab.stop()


def _collect_process(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as output:
        return subprocess.Popen(
            [*lmtp_gateway_command(), "collect", "--config", str(config_path), "--log-json"],
            stdout=output,
            stderr=output,
        )


async def test_killed_mid_batch_and_restarted_loses_and_doubles_nothing(
    dovecot: DovecotServer, redis: Any, tmp_path: Path
) -> None:
    total = 400
    deliver_numbered(dovecot, range(total))
    config_path = tmp_path / "collect.yml"
    data = gateway_yaml(
        tmp_path / "spool",
        incoming_email={**imap_settings(dovecot), "delivery_method": "sidekiq"},
        service_desk_email=None,
        redis={"url": redis.url},
    )
    config_path.write_text(yaml.safe_dump(data))
    log = tmp_path / "collect.log"
    for _ in range(3):
        process = _collect_process(config_path, log)
        try:
            seen = len(jobs(redis))
            await eventually(
                lambda seen=seen: len(jobs(redis)) > seen or len(jobs(redis)) == total, timeout=20, what="progress"
            )
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        if len(jobs(redis)) == total:
            break
    process = _collect_process(config_path, log)
    try:
        await eventually(lambda: len(jobs(redis)) >= total, timeout=60, what=f"{total} jobs")
        with Inspector(dovecot) as mailbox:
            await eventually(lambda: not mailbox.unseen_subjects(), timeout=20, what="everything marked read")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()[-3000:]
    assert subjects(redis) == Counter(range(total))
    journal = Journal(tmp_path / "spool")
    assert len(list(journal.entries(State.DELIVERED))) == total  # one journal entry per message: no second copy


async def test_uidvalidity_change_collects_new_mail_and_recognises_old(
    dovecot: DovecotServer, redis: Any, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    deliver_numbered(dovecot, range(5))
    config = collect_config(spool, dovecot, redis, delete_after_delivery=False)  # marked read only
    assert (await Gateway(config, listen=False, collect=True).collect_once()).collected
    (state_file,) = (spool / "collectors").glob("*.json")
    before = json.loads(state_file.read_text())["uidvalidity"]
    # Dovecot gives the mailbox a new UIDVALIDITY when its UID list and indexes are lost (the flags live on, in
    # the file names)
    for path in [*dovecot.maildir().glob("dovecot.index*"), dovecot.maildir() / "dovecot-uidlist"]:
        path.unlink()
    deliver_numbered(dovecot, range(5, 8))
    with Inspector(dovecot) as mailbox:
        mailbox.mark_unseen(mailbox.flags())  # the server forgot everything: all five old ones look new
    report = await Gateway(config, listen=False, collect=True).collect_once()
    assert json.loads(state_file.read_text())["uidvalidity"] != before
    assert report.collected == {"incoming_email": 3}  # the journal recognised the five it already had
    assert subjects(redis) == Counter(range(8))
    with Inspector(dovecot) as mailbox:
        assert mailbox.unseen_subjects() == set()


async def test_a_read_message_too_large_for_now_is_collected_once_the_limit_is_raised(
    dovecot: DovecotServer, redis: Any, tmp_path: Path
) -> None:
    """Message 0 was read in webmail and is over lmtp.max_message_size: it is left and reported, and must not
    be passed over for good while the messages after it are collected; raising the limit brings it in."""

    def config(limit: int) -> Config:
        return make_config(
            tmp_path / "spool",
            incoming_email={**imap_settings(dovecot, delete_after_delivery=False), "delivery_method": "sidekiq"},
            service_desk_email=None,
            redis={"url": redis.url},
            lmtp={"max_message_size": limit},
        )

    await Gateway(config(1 << 20), listen=False, collect=True).collect_once()  # from now on, read mail counts
    # more than one batch (50) behind it, so the pass goes on after the first settle
    deliver(dovecot, [numbered_message(0, body="x" * 20_000), *(numbered_message(n) for n in range(1, 61))])
    with Inspector(dovecot) as mailbox:
        first = min(mailbox.flags())
        mailbox.imap.uid("STORE", str(first), "+FLAGS.SILENT", r"(\Seen)")
    report = await Gateway(config(10_000), listen=False, collect=True).collect_once()
    assert report.collected == {"incoming_email": 60} and subjects(redis) == Counter(range(1, 61))
    report = await Gateway(config(1 << 20), listen=False, collect=True).collect_once()
    assert report.collected == {"incoming_email": 1} and subjects(redis) == Counter(range(61))


async def test_two_collectors_on_one_mailbox_take_each_message_once(
    dovecot: DovecotServer, redis: Any, tmp_path: Path
) -> None:
    total = 300
    deliver_numbered(dovecot, range(total))
    gateways = [
        Gateway(collect_config(tmp_path / f"spool{n}", dovecot, redis), listen=False, collect=True) for n in (1, 2)
    ]
    reports = await asyncio.gather(*(g.collect_once() for g in gateways))
    taken = [r.collected["incoming_email"] for r in reports]
    assert sum(taken) == total, taken  # no message journaled by both
    journaled = [{e.id for e in Journal(tmp_path / f"spool{n}").entries(State.DELIVERED)} for n in (1, 2)]
    assert not journaled[0] & journaled[1]
    assert subjects(redis) == Counter(range(total))


async def test_two_collectors_arbitrate_in_redis_whatever_the_delivery(
    dovecot: DovecotServer, redis: Any, tmp_path: Path
) -> None:
    """Delivery to a Maildir (or a webhook) needs no Redis, but with a redis: section the collectors use it to
    share the mailbox, as mail_room does."""
    deliver_numbered(dovecot, range(100))
    spools = [tmp_path / f"spool{n}" for n in (1, 2)]
    configs = [
        make_config(spool, incoming_email=imap_settings(dovecot), service_desk_email=None, redis={"url": redis.url})
        for spool in spools
    ]
    reports = await asyncio.gather(*(Gateway(c, listen=False, collect=True).collect_once() for c in configs))
    assert sum(r.collected["incoming_email"] for r in reports) == 100
    maildirs = [spool / "maildir" / "incoming_email" / "new" for spool in spools]
    delivered = [_number(path.read_bytes()) for maildir in maildirs for path in maildir.glob("*")]
    assert Counter(delivered) == Counter(range(100))  # each message in exactly one of the two Maildirs


@pytest.mark.parametrize("mode", ["start_tls", "ssl"])
async def test_tls_verifies_the_certificate(mode: str, dovecot_tls: DovecotServer, redis: Any, tmp_path: Path) -> None:
    cert = dovecot_tls.tmpdir / "tls.pem"
    port = dovecot_tls.imap_port if mode == "start_tls" else dovecot_tls.imaps_port  # type: ignore[attr-defined]
    deliver_numbered(dovecot_tls, range(2))

    async def collect(spool: str, **settings: Any) -> Any:
        config = collect_config(tmp_path / spool, dovecot_tls, redis, port=port, **{mode: True}, **settings)
        return await Gateway(config, listen=False, collect=True).collect_once()

    untrusted = await collect("a")
    assert "certificate not trusted" in untrusted.errors["incoming_email"]
    assert "ssl_ca_file" in untrusted.errors["incoming_email"]
    assert untrusted.collected == {"incoming_email": 0}
    trusted = await collect("b", ssl_ca_file=str(cert))  # verified: the certificate names 127.0.0.1
    assert trusted.errors == {} and trusted.collected == {"incoming_email": 2}
    deliver_numbered(dovecot_tls, [2])
    relaxed = await collect("c", ssl_verify=False)
    assert relaxed.errors == {} and relaxed.collected == {"incoming_email": 1}


@pytest.fixture
def dovecot_tls(tmp_path: Path) -> Iterator[DovecotServer]:
    """Dovecot with STARTTLS on its IMAP port and implicit TLS on another, with a certificate for 127.0.0.1."""
    from tests.servers import free_port

    cert, key = tmp_path / "tls.pem", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=imap.test",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    imaps_port = free_port()
    listener = f"service imap-login {{\n inet_listener imaps {{\n address = 127.0.0.1\n port = {imaps_port}\n }}\n}}\n"
    server = DovecotServer(extra_config=f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\n{listener}")
    with server:
        (server.tmpdir / "tls.pem").write_bytes(cert.read_bytes())
        server.imaps_port = imaps_port  # type: ignore[attr-defined]
        yield server


def test_collect_without_a_collected_mailbox_says_what_to_configure(tmp_path: Path) -> None:
    config = tmp_path / "gw.yml"
    config.write_text(yaml.safe_dump(gateway_yaml(tmp_path / "spool")))
    done = subprocess.run(
        [*lmtp_gateway_command(), "collect", "--config", str(config), "--once"], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "no mailbox to collect from" in done.stderr and ".host" in done.stderr


def test_a_second_owner_of_the_journal_is_refused(tmp_path: Path) -> None:
    first = Journal(tmp_path / "spool")
    first.open()
    try:
        from lmtp_gateway.errors import JournalError

        with pytest.raises(JournalError, match="in use by another lmtp-gateway process"):
            Journal(tmp_path / "spool").open()
    finally:
        first.close()
    second = Journal(tmp_path / "spool")
    second.open()  # free again once the first owner closed it
    second.close()


def test_imap_settings_missing_password_is_a_config_error(tmp_path: Path) -> None:
    from lmtp_gateway.collect import build_source

    config = make_config(
        tmp_path / "spool", incoming_email={"host": "imap.example.com", "user": "gitlab"}, service_desk_email=None
    )
    with pytest.raises(ConfigError, match=r"incoming_email.password: missing"):
        build_source(config, config.mailboxes["incoming_email"], tmp_path)


async def test_xoauth2_login_with_an_app_token(redis: Any, tmp_path: Path) -> None:
    """Exchange Online without basic auth: a client-credentials token, checked by Dovecot's oauth2 passdb
    against the identity provider's introspection endpoint (RFC 7662)."""
    from tests.graph_stub import GraphStub

    identity = GraphStub(user="gitlab").start()
    oauth2 = tmp_path / "dovecot-oauth2.conf.ext"
    oauth2.write_text(
        f"introspection_mode = post\nintrospection_url = {identity.url}/introspect\n"
        "username_attribute = username\nactive_attribute = active\nactive_value = true\n"
    )
    passdb = f"passdb {{\n driver = oauth2\n mechanisms = xoauth2\n args = {oauth2}\n}}\n"
    extra = "auth_mechanisms = plain login xoauth2\n" + passdb
    try:
        with DovecotServer(extra_config=extra) as dovecot:
            deliver_numbered(dovecot, range(3))
            options = {
                "tenant_id": identity.tenant,
                "client_id": identity.client_id,
                "client_secret": identity.client_secret,
                "azure_ad_endpoint": identity.login_endpoint,
                "scope": f"{identity.graph_endpoint}/.default",
            }
            settings = {"inbox_options": options}
            config = collect_config(tmp_path / "spool", dovecot, redis, **settings)
            report = await Gateway(config, listen=False, collect=True).collect_once()
            assert report.errors == {} and report.collected == {"incoming_email": 3}
            assert "method=XOAUTH2" in dovecot.log_path.read_text()
            assert identity.token_requests == 1

            wrong = {**settings, "inbox_options": {**options, "client_secret": "not-it"}}
            report = await Gateway(
                collect_config(tmp_path / "spool2", dovecot, redis, **wrong), listen=False, collect=True
            ).collect_once()
            assert "AADSTS7000215" in report.errors["incoming_email"]
    finally:
        identity.stop()


async def test_a_server_without_idle_is_polled(redis: Any, tmp_path: Path, start_gateway: StartGateway) -> None:
    without_idle = "imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE SORT UIDPLUS\n"
    with DovecotServer(extra_config=without_idle) as dovecot:
        config = collect_config(tmp_path / "spool", dovecot, redis, idle_timeout=1)
        running = await start_gateway(config, listen=False, collect=True)
        (collector,) = running.gateway.collectors
        await eventually(lambda: collector.status.state == "idle", what="collector waiting")
        assert not collector.source._client.has_capability("IDLE")
        deliver_numbered(dovecot, [1, 2])
        await eventually(lambda: len(jobs(redis)) == 2, timeout=30, what="two jobs by polling")
        assert subjects(redis) == Counter([1, 2])


async def test_a_failing_mailbox_does_not_stop_the_others(
    dovecot: DovecotServer, redis: Any, tmp_path: Path, start_gateway: StartGateway
) -> None:
    from tests.servers import free_port

    dead = {**imap_settings(dovecot, port=free_port()), "address": "contact+%{key}@incoming.test"}
    config = make_config(
        tmp_path / "spool",
        incoming_email={**imap_settings(dovecot), "delivery_method": "sidekiq"},
        service_desk_email={**dead, "delivery_method": "sidekiq"},
        redis={"url": redis.url},
    )
    running = await start_gateway(config, listen=False, collect=True, backoff_base=0.05)
    working, failing = running.gateway.collectors
    await eventually(lambda: failing.status.last_error and working.status.state == "idle", what="both states")
    assert "cannot connect" in failing.status.last_error
    deliver_numbered(dovecot, [5])
    await eventually(lambda: jobs(redis), what="the working mailbox's job")
    assert subjects(redis) == Counter([5])
    assert failing.status.state in ("backoff", "connecting")
    deadline = time.monotonic() + 30
    while not (problems := await running.gateway.health()):  # /readyz names the mailbox that cannot be collected
        assert time.monotonic() < deadline, "no /readyz problem reported"
        await asyncio.sleep(0.02)
    (problem,) = problems
    assert problem.startswith("collector service_desk_email: cannot connect")


def test_collect_once_from_gitlab_yml_as_it_is(dovecot: DovecotServer, tmp_path: Path) -> None:
    """GitLab's own gitlab.yml, webhook delivery to GitLab's mail_room API, run from cron with --once."""
    key = b"m" * 32
    secret = mailroom_secret_file(tmp_path, key)
    gitlab = GitLabStub(key).start()
    try:
        deliver_numbered(dovecot, range(12))
        port = int(gitlab.url.rsplit(":", 1)[1])
        gitlab_yml = {
            "production": {
                "gitlab": {"host": "127.0.0.1", "port": port, "https": False},
                "incoming_email": {
                    "enabled": True,
                    "address": "incoming+%{key}@incoming.test",
                    "user": dovecot.user,
                    "password": dovecot.password,
                    "host": dovecot.host,
                    "port": dovecot.imap_port,
                    "ssl": False,
                    "start_tls": False,
                    "mailbox": "inbox",
                    "idle_timeout": 60,
                    "log_path": "log/mail_room_json.log",
                    "delete_after_delivery": True,
                    "expunge_deleted": False,
                    "delivery_method": "webhook",
                    "secret_file": str(secret),
                },
            }
        }
        config = tmp_path / "gitlab.yml"
        config.write_text(yaml.safe_dump(gitlab_yml))
        argv = [*lmtp_gateway_command(), "collect", "--config", str(config), "--once", "--spool", str(tmp_path / "s")]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            "incoming_email: 12 collected",
            "delivered 12; 0 left pending in the journal for the next run",
        ]
        assert Counter(_number(r.body) for r in gitlab.received) == Counter(range(12))
        with Inspector(dovecot) as mailbox:
            assert all(r"\Deleted" in flags for flags in mailbox.flags().values())
        gitlab.enabled = ()  # GitLab answers 401 now (mailbox disabled): kept, retried next run, exit 1
        deliver_numbered(dovecot, [12])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert done.stdout.splitlines()[-1] == "delivered 0; 1 left pending in the journal for the next run"
    finally:
        gitlab.stop()


async def test_collect_reports_its_state_and_counts_on_metrics(
    dovecot: DovecotServer, redis: Any, tmp_path: Path, start_gateway: StartGateway
) -> None:
    import httpx

    deliver_numbered(dovecot, range(4))
    config = make_config(
        tmp_path / "spool",
        incoming_email={**imap_settings(dovecot), "delivery_method": "sidekiq"},
        service_desk_email=None,
        redis={"url": redis.url},
        monitoring={"listen": "off", "collect_listen": "127.0.0.1:0"},
    )
    running = await start_gateway(config, listen=False, collect=True)
    (collector,) = running.gateway.collectors
    await eventually(lambda: collector.status.state == "idle" and len(jobs(redis)) == 4, what="drained")
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://{running.gateway.ops.address}/metrics")).text
    assert 'lmtp_gateway_collected_total{mailbox="incoming_email"} 4.0' in text
    assert 'lmtp_gateway_collector_state{mailbox="incoming_email",state="idle"} 1.0' in text
    assert 'lmtp_gateway_collector_state{mailbox="incoming_email",state="backoff"} 0.0' in text


async def test_a_server_restart_while_idle_is_survived(
    dovecot: DovecotServer, redis: Any, tmp_path: Path, start_gateway: StartGateway
) -> None:
    running = await start_gateway(collect_config(tmp_path / "spool", dovecot, redis), listen=False, collect=True)
    (collector,) = running.gateway.collectors
    await eventually(lambda: collector.status.state == "idle", what="collector idling")
    dovecot.stop()
    await eventually(lambda: collector.status.state == "backoff", what="the collector to notice")
    dovecot.start()
    deliver_numbered(dovecot, [3])
    await eventually(lambda: jobs(redis), timeout=20, what="the job after the restart")
    assert subjects(redis) == Counter([3])


async def test_a_message_left_to_another_collector_is_not_passed_over(
    dovecot: DovecotServer, redis: Any, tmp_path: Path
) -> None:
    """Someone read message 1 in webmail before it was collected, and another collector held its claim when this
    one took message 2. That collector died: message 1 must still be collected, although it is read and below
    a UID this collector has settled."""
    config = collect_config(tmp_path / "spool", dovecot, redis, delete_after_delivery=False)
    await Gateway(config, listen=False, collect=True).collect_once()  # from now on, read mail is collected too
    deliver_numbered(dovecot, [0, 1])
    with Inspector(dovecot) as mailbox:
        first, _ = sorted(mailbox.flags())
        mailbox.imap.uid("STORE", str(first), "+FLAGS.SILENT", r"(\Seen)")
        uidvalidity = mailbox.uidvalidity()
    identity = ImapSettings.from_config(imap_settings(dovecot), "test").identity
    held = f"{arbiter.PREFIX}{identity}:{uidvalidity}:{first}"  # the claim the other collector holds
    redis.command("SET", held, "another-collector", "PX", "600000")
    report = await Gateway(config, listen=False, collect=True).collect_once()
    assert report.collected == {"incoming_email": 1} and subjects(redis) == Counter([1])
    redis.command("DEL", held)  # its lease is over
    report = await Gateway(config, listen=False, collect=True).collect_once()
    assert report.collected == {"incoming_email": 1} and subjects(redis) == Counter([0, 1])


def test_collect_mailbox_takes_only_the_one_named(dovecot: DovecotServer, tmp_path: Path) -> None:
    """--mailbox: the Service Desk mailbox's server is down; the incoming one can still be drained on its own."""
    from tests.servers import free_port

    dead = {**imap_settings(dovecot, port=free_port()), "address": "contact+%{key}@incoming.test"}
    config = tmp_path / "gw.yml"
    config.write_text(
        yaml.safe_dump(gateway_yaml(tmp_path / "spool", incoming_email=imap_settings(dovecot), service_desk_email=dead))
    )

    def collect(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = [*lmtp_gateway_command(), "collect", "--config", str(config), "--once", *extra]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    both = collect()
    assert both.returncode == 1 and "service_desk_email" in both.stdout + both.stderr
    deliver_numbered(dovecot, range(3))
    one = collect("--mailbox", "incoming_email")
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines()[0] == "incoming_email: 3 collected" and "service_desk_email" not in one.stdout
    assert len(list((tmp_path / "spool" / "maildir" / "incoming_email" / "new").iterdir())) == 3
