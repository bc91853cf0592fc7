"""`lmtp-gateway check` as an admin runs it: healthy, then with each dependency broken for real (no LMTP listener,
Redis stopped, GitLab refusing the token, a read-only journal, an MX elsewhere, the main mail domain), against a
real gateway, a real Redis, the GitLab stand-in and a real DNS server (dnsmasq)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmtp_gateway.check import main_domain_reason
from tests.conftest import StartGateway, gateway_yaml, lmtp_gateway_command, mailroom_secret_file, remount
from tests.gitlab_stub import GitLabStub
from tests.servers import free_port
from tests.servers.dnsmasq import DnsmasqServer

KEY = os.urandom(32)
HOST = "gitlab.example.test"
DOMAIN = f"incoming.{HOST}"
FIX_LMTP = "is `lmtp-gateway serve` running? Start it (systemctl start lmtp-gateway), or fix lmtp.listen"


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsmasqServer]:
    server = DnsmasqServer(
        mx={DOMAIN: [f"mx.{HOST}"], "example.test": [f"mx.{HOST}"], f"away.{HOST}": ["mail.elsewhere.test"]},
        addresses={f"mx.{HOST}": "127.0.0.1", "mail.elsewhere.test": "192.0.2.7"},
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def gitlab() -> Iterator[GitLabStub]:
    stub = GitLabStub(KEY).start()
    yield stub
    stub.stop()


@pytest.fixture
async def lmtp_address(start_gateway: StartGateway) -> str:
    """A running gateway for the LMTP check to talk to (the checked configuration has its own journal)."""
    return (await start_gateway()).address


def write_config(tmp_path: Path, lmtp_address: str, domain: str = DOMAIN, **sections: Any) -> Path:
    base: dict[str, Any] = {
        "gitlab": {"host": HOST},
        "incoming_email": {"address": f"incoming+%{{key}}@{domain}"},
        "service_desk_email": {"address": f"contact+%{{key}}@{domain}"},
        "lmtp": {"listen": lmtp_address},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    data = gateway_yaml(tmp_path / "checked-spool", **base)
    path = tmp_path / "checked.yml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "checked-spool").mkdir(exist_ok=True)
    return path


def secret_file(tmp_path: Path, key: bytes = KEY) -> Path:
    return mailroom_secret_file(tmp_path, key)


async def run_check(config: Path, dns: DnsmasqServer, *extra: str) -> subprocess.CompletedProcess[str]:
    """The real command, in a thread: the in-process gateway it checks keeps answering meanwhile."""
    argv = [*lmtp_gateway_command(), "check", "--config", str(config), "--nameserver", dns.nameserver, *extra]
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)


def line(done: subprocess.CompletedProcess[str], start: str) -> str:
    (found,) = [text for text in done.stdout.splitlines() if text.startswith(start)]
    return found


async def test_healthy(lmtp_address: str, redis: Any, gitlab: GitLabStub, dns: DnsmasqServer, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        lmtp_address,
        gitlab={"url": gitlab.url},
        incoming_email={"delivery_method": "sidekiq"},
        service_desk_email={"delivery_method": "webhook", "secret_file": str(secret_file(tmp_path))},
        redis={"url": redis.url},
    )
    done = await run_check(config, dns)
    spool = tmp_path / "checked-spool"
    lines = done.stdout.splitlines()
    assert lines[:4] == [
        f"ok    configuration {config} is valid (incoming_email → sidekiq, service_desk_email → webhook)",
        f"ok    LMTP {lmtp_address} answers LHLO",
        f"ok    Redis {redis.url}: reachable, queue:default writable",
        f"ok    webhook service_desk_email: GitLab accepts the token at "
        f"{gitlab.url}/api/v4/internal/mail_room/service_desk_email (200)",
    ]
    assert re.fullmatch(rf"ok    journal {re.escape(str(spool))} writable, \d+\.\d GiB free", lines[4])
    assert lines[5:] == [
        "skip  collectors: no mailbox is collected over IMAP or Microsoft Graph",
        f"ok    DNS {DOMAIN}: MX mx.{HOST} (127.0.0.1) points at this host",
        f"ok    incoming_email and service_desk_email: {DOMAIN} is a subdomain, not the main mail domain",
    ]
    assert done.returncode == 0, done.stderr
    (probe,) = gitlab.received  # the token was proven with an empty message, which GitLab discards
    assert probe.body == b"" and probe.mailbox == "service_desk_email"
    assert redis.command("LLEN", "queue:default") == 0  # the Redis probe pushed no job
    assert not any(p.name.startswith("probe") for p in spool.rglob("*"))  # and the journal probe left nothing

    as_json = json.loads((await run_check(config, dns, "--json")).stdout)
    assert as_json["ok"] is True and as_json["counts"] == {"ok": 7, "warn": 0, "fail": 0, "skip": 1}
    assert as_json["checks"][1] == {"status": "ok", "what": f"LMTP {lmtp_address} answers LHLO", "fix": ""}


async def test_no_lmtp_listener(dns: DnsmasqServer, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    done = await run_check(write_config(tmp_path, address), dns)
    assert line(done, "fail") == f"fail  LMTP {address}: connection refused  — {FIX_LMTP}"
    assert "skip  Redis: no mailbox delivers with sidekiq" in done.stdout
    assert done.returncode == 1


async def test_redis_down(lmtp_address: str, redis: Any, dns: DnsmasqServer, tmp_path: Path) -> None:
    config = write_config(
        tmp_path, lmtp_address, incoming_email={"delivery_method": "sidekiq"}, redis={"url": redis.url}
    )
    redis.stop()
    done = await run_check(config, dns)
    assert line(done, "fail") == (
        f"fail  Redis {redis.url}: redis: ConnectionError: Connection refused  — "
        "start Redis, or set redis.url (or redis.sentinels) to GitLab's Redis for queues"
    )
    assert done.returncode == 1


async def test_redis_for_arbitration_only_and_another_spool(
    lmtp_address: str, redis: Any, dns: DnsmasqServer, tmp_path: Path
) -> None:
    """Maildir delivery with a redis: section: Redis serves the collectors' arbitration, and check says so
    without touching a queue; --spool checks the journal given, as serve and collect would use it."""
    config = write_config(tmp_path, lmtp_address, redis={"url": redis.url})
    other = tmp_path / "collect-journal"
    other.mkdir()
    done = await run_check(config, dns, "--spool", str(other))
    assert f"ok    Redis {redis.url}: reachable and writable (collector arbitration)" in done.stdout
    assert redis.command("EXISTS", "queue:default") == 0
    assert re.search(rf"ok    journal {re.escape(str(other))} writable", done.stdout)


async def test_redis_password_is_never_printed(
    lmtp_address: str, redis: Any, dns: DnsmasqServer, tmp_path: Path
) -> None:
    redis.command("ACL", "SETUSER", "checker", "on", ">s3cr3t-pass", "~*", "&*", "+@all")
    try:
        url = f"redis://checker:s3cr3t-pass@127.0.0.1:{redis.port}/0"
        config = write_config(tmp_path, lmtp_address, incoming_email={"delivery_method": "sidekiq"}, redis={"url": url})
        done = await run_check(config, dns)
        redis.command("ACL", "SETUSER", "checker", "resetpass", ">other")
        refused = await run_check(config, dns)
    finally:
        redis.command("ACL", "DELUSER", "checker")
    where = f"Redis redis://checker:***@127.0.0.1:{redis.port}/0"
    assert f"ok    {where}: reachable, queue:default writable" in done.stdout and done.returncode == 0
    assert line(refused, "fail").startswith(f"fail  {where}: redis: AuthenticationError")
    assert "s3cr3t-pass" not in done.stdout + done.stderr + refused.stdout + refused.stderr


async def test_webhook_token_refused(lmtp_address: str, gitlab: GitLabStub, dns: DnsmasqServer, tmp_path: Path) -> None:
    wrong = secret_file(tmp_path, key=os.urandom(32))
    config = write_config(
        tmp_path,
        lmtp_address,
        gitlab={"url": gitlab.url},
        incoming_email={"delivery_method": "webhook", "secret_file": str(wrong)},
    )
    done = await run_check(config, dns)
    assert line(done, "fail") == (
        f"fail  webhook incoming_email: GitLab answered 401 at {gitlab.url}/api/v4/internal/mail_room/incoming_email"
        f"  — {wrong} must hold GitLab's .gitlab_mailroom_secret, and incoming_email must be enabled in GitLab with "
        "delivery_method: webhook"
    )
    assert not gitlab.received and done.returncode == 1


async def test_journal_not_writable(lmtp_address: str, dns: DnsmasqServer, small_disk: Path, tmp_path: Path) -> None:
    spool = small_disk / "spool"
    spool.mkdir()
    config = write_config(tmp_path, lmtp_address, spool={"path": str(spool)}, lmtp={"max_message_size": "1M"})
    writable = await run_check(config, dns)
    assert re.search(
        rf"^warn  journal {spool} writable, but only \d MiB free  — free space there", writable.stdout, re.M
    )
    assert writable.returncode == 0
    remount(small_disk, "ro")  # root ignores modes; a read-only file system stops it
    try:
        done = await run_check(config, dns)
    finally:
        remount(small_disk, "rw")
    assert line(done, "fail") == (
        f"fail  journal file system is read-only: {spool}  — free space or fix the mount and permissions of "
        "spool.path; serve answers 452 until it can write"
    )
    assert done.returncode == 1


async def test_mx_pointing_elsewhere_warns(lmtp_address: str, dns: DnsmasqServer, tmp_path: Path) -> None:
    domain = f"away.{HOST}"
    done = await run_check(write_config(tmp_path, lmtp_address, domain=domain), dns)
    assert line(done, f"warn  DNS {domain}") == (
        f"warn  DNS {domain}: MX points at mail.elsewhere.test (192.0.2.7), not at this host  — point the MX of "
        f"{domain} at this host, or make sure mail.elsewhere.test relays {domain} to it"
    )
    assert done.returncode == 0  # a relay in front is a normal set-up: a warning, not a failure


async def test_unknown_domain_fails(lmtp_address: str, dns: DnsmasqServer, tmp_path: Path) -> None:
    domain = f"nowhere.{HOST}"
    done = await run_check(write_config(tmp_path, lmtp_address, domain=domain), dns)
    assert line(done, "fail") == (
        f"fail  DNS {domain}: no such domain  — create {domain} with an MX record pointing at this host "
        "(or at a relay that forwards to it)"
    )
    assert done.returncode == 1


async def test_main_mail_domain_warns(lmtp_address: str, dns: DnsmasqServer, tmp_path: Path) -> None:
    done = await run_check(write_config(tmp_path, lmtp_address, domain="example.test"), dns)
    assert "ok    DNS example.test: MX mx.gitlab.example.test (127.0.0.1) points at this host" in done.stdout
    assert line(done, "warn  incoming_email") == (
        "warn  incoming_email and service_desk_email: example.test looks like the organisation's main mail domain "
        f"(it is the parent of gitlab.host {HOST})  — use a subdomain only GitLab receives mail for, such as "
        f"incoming.{HOST}: anyone who can receive mail at example.test (every GitLab user can, through these "
        "addresses) passes 'prove you own an address at example.test' checks"
    )
    assert done.returncode == 0


def test_main_domain_rule() -> None:
    assert (
        main_domain_reason("example.com", "gitlab.example.com") == "it is the parent of gitlab.host gitlab.example.com"
    )
    assert main_domain_reason("example.com", "gitlab.dev.example.com") == (
        "it is an ancestor of gitlab.host gitlab.dev.example.com"
    )
    assert main_domain_reason("example.org", "localhost") == "it has no subdomain label"
    assert main_domain_reason("incoming.gitlab.example.com", "gitlab.example.com") is None
    assert main_domain_reason("gitlab.example.com", "gitlab.example.com") is None  # GitLab's own host name
    assert main_domain_reason("localhost", "localhost") is None


def test_help_shows_an_example() -> None:
    done = subprocess.run([*lmtp_gateway_command(), "check", "--help"], capture_output=True, text=True, check=True)
    assert re.search(r"Example:\n +lmtp-gateway check --config /etc/lmtp-gateway/gateway.yml\n", done.stdout)
    assert "--nameserver HOST[:PORT]" in done.stdout and "--json" in done.stdout


def test_a_configuration_that_does_not_load(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("incoming_email:\n  adress: x\n")
    done = subprocess.run([*lmtp_gateway_command(), "check", "--config", str(bad)], capture_output=True, text=True)
    assert done.stdout == (
        f"fail  configuration: {bad}: incoming_email.adress: unknown key (did you mean 'address'?)"
        "  — correct the file and run check again\n"
    )
    assert done.returncode == 1


async def test_collector_login(dns: DnsmasqServer, tmp_path: Path) -> None:
    from tests.servers.dovecot import DovecotServer

    with DovecotServer() as dovecot:
        imap = {"host": dovecot.host, "port": dovecot.imap_port, "user": dovecot.user, "password": dovecot.password}
        config = write_config(tmp_path, "127.0.0.1:1", incoming_email=imap)
        done = await run_check(config, dns)
        where = f"imap:{dovecot.user}@{dovecot.host}:{dovecot.imap_port}/inbox"
        assert line(done, "ok    imap:") == f"ok    {where}: logged in, folder opened"
        assert line(done, "fail  LMTP").startswith("fail  LMTP 127.0.0.1:1")  # service desk still comes by LMTP
        assert not (tmp_path / "checked-spool" / "collectors").exists()  # the check kept no collector state

        config = write_config(tmp_path, "127.0.0.1:1", incoming_email={**imap, "password": "wrong"})
        done = await run_check(config, dns)
        assert line(done, "fail  imap:").startswith(f"fail  {where}: LOGIN refused for {dovecot.user}")
        assert line(done, "fail  imap:").endswith("— check user and password (or inbox_options.client_id / "
                                                  "client_secret / tenant_id)")  # fmt: skip
        assert "wrong" not in done.stdout and done.returncode == 1


async def test_gitlab_url_credentials_are_masked(
    lmtp_address: str, gitlab: GitLabStub, dns: DnsmasqServer, tmp_path: Path
) -> None:
    wrong = secret_file(tmp_path, key=os.urandom(32))
    url = gitlab.url.replace("://", "://gluser:S3cretPassw0rd@")
    config = write_config(
        tmp_path, lmtp_address, gitlab={"url": url},
        incoming_email={"delivery_method": "webhook", "secret_file": str(wrong)},
    )  # fmt: skip
    done = await run_check(config, dns)
    assert "gluser:***@" in line(done, "fail") and "S3cretPassw0rd" not in done.stdout + done.stderr


async def test_damaged_entries_are_reported(lmtp_address: str, dns: DnsmasqServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, lmtp_address)
    quarantine = tmp_path / "checked-spool" / "quarantine"
    quarantine.mkdir(parents=True)
    (quarantine / f"{'b' * 24}.json").write_text("{")
    done = await run_check(config, dns)
    assert "1 damaged entries set aside" in line(done, "warn  journal")
    assert "lmtp-gateway replay --quarantined" in line(done, "warn  journal")


def test_a_secret_not_at_hand_says_where_to_set_it(tmp_path: Path) -> None:
    """The configuration names the variable right; the shell check runs in does not have it."""
    config = tmp_path / "gw.yml"
    config.write_text('incoming_email:\n  address: "a+%{key}@b.example"\n  host: imap.example.org\n  user: u\n'
                      "  password_env: INCOMING_EMAIL_PASSWORD_NOT_HERE\n")  # fmt: skip
    done = subprocess.run([*lmtp_gateway_command(), "check", "--config", str(config)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert "INCOMING_EMAIL_PASSWORD_NOT_HERE is not set" in done.stdout
    assert "run check in the service's environment" in done.stdout and "correct the file" not in done.stdout
