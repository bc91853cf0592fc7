"""End to end through a real Postfix configured with exactly what `lmtp-gateway postfix-config` prints.

A sending server talks SMTP to Postfix; Postfix asks the policy service at RCPT and hands mail to the gateway
over LMTP; the gateway pushes Sidekiq jobs into a real Redis. Nothing is bounced, nothing is doubled.
"""

from __future__ import annotations

import contextlib
import json
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPLY_KEY, GatewayProcess, gateway_yaml, lmtp_gateway_command, message
from tests.servers import free_port, require_binary, wait_until

DOMAIN = "incoming.test"
REPLY = f"incoming+{REPLY_KEY}@{DOMAIN}"
NEW_ISSUE = f"incoming+group-project-42-Tok3nAuth-issue@{DOMAIN}"
NEW_MR = f"incoming+group-project-42-Tok3nAuth-merge-request@{DOMAIN}"
SERVICE_DESK = f"contact+group-project-support_key@{DOMAIN}"
SIZE_LIMIT = 200_000


@dataclass
class FrontDoor:
    postfix: Any
    gateway: GatewayProcess
    redis: Any
    spool: Path

    def send(self, rcpt: str, raw: bytes, sender: str = "alice@example.org") -> None:
        with smtplib.SMTP(self.postfix.host, self.postfix.port, timeout=30) as smtp:
            smtp.sendmail(sender, [rcpt], raw)

    def jobs(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.redis.command("LRANGE", "queue:default", "0", "-1")]

    def wait_jobs(self, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.jobs()) < count:
            assert time.monotonic() < deadline, f"{len(self.jobs())} of {count} jobs:\n{self.postfix.maillog_text()}"
            time.sleep(0.05)
        return self.jobs()


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def front_door(tmp_path: Path, redis: Any) -> Iterator[FrontDoor]:
    from tests.servers.postfix import postfix_for_gateway

    require_binary("postfix", "postfix")
    require_binary("openssl", "openssl")
    config_path = tmp_path / "gateway.yml"
    policy_port = free_port()
    data = gateway_yaml(
        tmp_path / "spool",
        gitlab={"host": "gitlab.test"},
        incoming_email={"delivery_method": "sidekiq"},
        service_desk_email={"delivery_method": "sidekiq"},
        redis={"url": redis.url},
        lmtp={"max_message_size": SIZE_LIMIT},
        policy={"listen": f"127.0.0.1:{policy_port}"},
    )
    config_path.write_text(yaml.safe_dump(data))
    with contextlib.ExitStack() as cleanup:  # whatever started is stopped, even when a later step fails
        gateway = GatewayProcess(config_path, tmp_path / "gateway.log").start()
        cleanup.callback(gateway.kill)
        with open(tmp_path / "policy.log", "wb") as log:
            policy = subprocess.Popen([*lmtp_gateway_command(), "policy", "--config", str(config_path)], stderr=log)
        cleanup.callback(policy.wait, 10)
        cleanup.callback(policy.terminate)
        wait_until(lambda: port_open(policy_port), timeout=15, what="the policy service", proc=policy)
        postfix = postfix_for_gateway(lmtp_gateway_command(), config_path, [DOMAIN], gateway.port, tmp_path).start()
        cleanup.callback(postfix.stop)
        # kept for a failed test's post-mortem (the Postfix instance's own directory goes with it)
        cleanup.callback(lambda: (tmp_path / "maillog").write_text(postfix.maillog_text()))
        assert postfix.postconf("transport_maps").endswith(f"gitlab-lmtp:inet:127.0.0.1:{gateway.port} }}")
        yield FrontDoor(postfix, gateway, redis, tmp_path / "spool")


def test_gitlab_mail_of_every_kind_becomes_the_right_job(front_door: FrontDoor) -> None:
    kinds = {
        REPLY: "EmailReceiverWorker",
        NEW_ISSUE: "EmailReceiverWorker",
        NEW_MR: "EmailReceiverWorker",
        SERVICE_DESK: "ServiceDeskEmailReceiverWorker",
    }
    for number, rcpt in enumerate(kinds):
        # The GitLab address is only in the envelope (a Bcc): Delivered-To must carry it to GitLab.
        front_door.send(rcpt, message("To: team@example.org", f"Subject: kind {number}", f"Message-ID: <k{number}@x>"))
    jobs = front_door.wait_jobs(4)
    by_rcpt = {}
    for job in jobs:
        (raw,) = job["args"]
        delivered_to = next(line for line in raw.splitlines() if line.startswith("Delivered-To: "))
        by_rcpt[delivered_to.removeprefix("Delivered-To: ")] = job
    assert {rcpt: job["class"] for rcpt, job in by_rcpt.items()} == kinds
    assert len({job["jid"] for job in jobs}) == 4
    assert "Received: from " in by_rcpt[REPLY]["args"][0]  # Postfix's trace header is kept
    assert not front_door.postfix.bounces()


def test_unknown_addresses_are_refused_during_rcpt_without_a_bounce(front_door: FrontDoor) -> None:
    refused = {
        f"nobody@{DOMAIN}": 550,  # no mailbox: the policy service says no
        f"incoming+not_a_valid_key@{DOMAIN}": 550,  # a key no GitLab handler takes
        f"incoming+host!user@{DOMAIN}": 554,  # Postfix itself reads a bang path and refuses to relay
    }
    for rcpt, expected in refused.items():
        with smtplib.SMTP(front_door.postfix.host, front_door.postfix.port, timeout=30) as smtp:
            smtp.ehlo("sender.example.org")
            smtp.mail("forged@victim.example")
            code, reply = smtp.rcpt(rcpt)
            assert code == expected, reply
            if expected == 550:
                assert b"Recipient address rejected" in reply and b"/run" not in reply
    assert not front_door.postfix.queue_ids()
    assert not front_door.postfix.bounces()
    assert not front_door.jobs()


def test_an_auto_reply_is_accepted_and_silently_dropped(front_door: FrontDoor) -> None:
    front_door.send(REPLY, message("Auto-Submitted: auto-replied", "Subject: Out of office"), sender="")
    front_door.postfix.wait_queue_empty()
    deadline = time.monotonic() + 10
    while not list((front_door.spool / "dropped").glob("*.json")):
        assert time.monotonic() < deadline, "no dropped entry"
        time.sleep(0.05)
    assert not front_door.jobs()
    assert not front_door.postfix.bounces()


def test_too_large_is_refused_at_smtp_time(front_door: FrontDoor) -> None:
    big = message("Subject: big", body="x" * 76 + "\n" * 1) * 4000  # about 300 kB
    with smtplib.SMTP(front_door.postfix.host, front_door.postfix.port, timeout=30) as smtp:
        smtp.ehlo("sender.example.org")
        code, _ = smtp.mail("alice@example.org", [f"SIZE={len(big)}"])
        assert code == 552
    with smtplib.SMTP(front_door.postfix.host, front_door.postfix.port, timeout=30) as smtp:
        smtp.ehlo("sender.example.org")
        smtp.mail("alice@example.org")
        assert smtp.rcpt(REPLY)[0] == 250
        code, _ = smtp.data(big)
        assert code == 552
    assert not front_door.postfix.queue_ids() and not front_door.postfix.bounces()


def test_redis_down_mail_is_accepted_and_delivered_when_it_returns(front_door: FrontDoor) -> None:
    front_door.redis.stop()
    front_door.send(REPLY, message("Subject: while Redis is down", "Message-ID: <r1@x>"))
    front_door.postfix.wait_queue_empty()  # the gateway took it: Postfix's part is done
    assert list((front_door.spool / "pending").glob("*.json"))
    front_door.redis.start()
    (job,) = front_door.wait_jobs(1, timeout=30)
    assert "while Redis is down" in job["args"][0]
    assert not front_door.postfix.bounces()


def test_gateway_down_postfix_queues_and_delivers_when_it_returns(front_door: FrontDoor) -> None:
    front_door.gateway.kill()
    front_door.send(NEW_ISSUE, message("Subject: while the gateway is down", "Message-ID: <g1@x>"))
    deferred = front_door.postfix.wait_deferred()
    assert len(deferred) == 1
    front_door.gateway.start()
    front_door.postfix.flush()
    (job,) = front_door.wait_jobs(1, timeout=30)
    assert "while the gateway is down" in job["args"][0]
    front_door.postfix.wait_queue_empty()
    assert len(front_door.jobs()) == 1 and not front_door.postfix.bounces()
