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
from collections.abc import Callable, Iterator
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


StartFrontDoor = Callable[..., FrontDoor]


@pytest.fixture
def start_front_door(tmp_path: Path, redis: Any) -> Iterator[StartFrontDoor]:
    """Postfix with exactly what `postfix-config` prints, the policy service, the milter and `serve`, for a
    gateway configuration with `sections` changed."""
    from tests.servers.postfix import postfix_for_gateway

    require_binary("postfix", "postfix")
    require_binary("openssl", "openssl")
    with contextlib.ExitStack() as cleanup:  # whatever started is stopped, even when a later step fails

        def start(**sections: Any) -> FrontDoor:
            config_path = tmp_path / "gateway.yml"
            policy_port, milter_port = free_port(), free_port()
            base: dict[str, dict[str, Any]] = {
                "gitlab": {"host": "gitlab.test"},
                "incoming_email": {"delivery_method": "sidekiq"},
                "service_desk_email": {"delivery_method": "sidekiq"},
                "redis": {"url": redis.url},
                "lmtp": {"max_message_size": SIZE_LIMIT},
                "policy": {"listen": f"127.0.0.1:{policy_port}"},
                "milter": {"listen": f"127.0.0.1:{milter_port}"},
            }
            for name, values in sections.items():
                base[name] = {**base.get(name, {}), **values}
            data = gateway_yaml(tmp_path / "spool", **base)
            config_path.write_text(yaml.safe_dump(data))
            gateway = GatewayProcess(config_path, tmp_path / "gateway.log").start()
            cleanup.callback(gateway.kill)
            for name, port in (("policy", policy_port), ("milter", milter_port)):
                with open(tmp_path / f"{name}.log", "wb") as log:
                    argv = [*lmtp_gateway_command(), name, "--config", str(config_path)]
                    service = subprocess.Popen(argv, stderr=log)
                cleanup.callback(service.wait, 10)
                cleanup.callback(service.terminate)
                wait_until(lambda port=port: port_open(port), timeout=60, what=f"the {name} service", proc=service)
            postfix = postfix_for_gateway(lmtp_gateway_command(), config_path, [DOMAIN], gateway.port, tmp_path)
            postfix.start()
            cleanup.callback(postfix.stop)
            # kept for a failed test's post-mortem (the Postfix instance's own directory goes with it)
            cleanup.callback(lambda: (tmp_path / "maillog").write_text(postfix.maillog_text()))
            assert postfix.postconf("transport_maps").endswith(f"gitlab-lmtp:inet:127.0.0.1:{gateway.port} }}")
            return FrontDoor(postfix, gateway, redis, tmp_path / "spool")

        yield start


@pytest.fixture
def front_door(start_front_door: StartFrontDoor) -> FrontDoor:
    return start_front_door()


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
        f"incoming+host!user@{DOMAIN}": 454,  # Postfix reads a bang path: relay denied (its default defers)
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
    front_door.send(REPLY, message("Subject: a human's reply", "Message-ID: <human@x>"))  # after it, in order
    (job,) = front_door.wait_jobs(1)
    assert "a human's reply" in job["args"][0]  # the auto-reply made no job before the human's mail made one
    front_door.postfix.wait_queue_empty()
    assert len(list((front_door.spool / "dropped").glob("*.json"))) == 1
    assert len(front_door.jobs()) == 1 and not front_door.postfix.bounces()


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
    waiting = [*(front_door.spool / "pending").glob("*.json"), *(front_door.spool / "deferred").glob("*.json")]
    assert len(waiting) == 1  # in the journal, before or after its first attempt
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


DEDICATED = f"reply@{DOMAIN}"


def test_mail_gitlab_would_refuse_is_refused_before_postfix_queues_it(start_front_door: StartFrontDoor) -> None:
    """A dedicated address (no %{key}) and no key in the headers: the sending server gets 550 at the end of DATA
    from the milter; Postfix queues nothing and sends no non-delivery notification to the (maybe forged) sender."""
    front_door = start_front_door(incoming_email={"address": DEDICATED})
    with smtplib.SMTP(front_door.postfix.host, front_door.postfix.port, timeout=30) as smtp:
        smtp.ehlo("sender.example.org")
        smtp.mail("forged@victim.example")
        assert smtp.rcpt(DEDICATED)[0] == 250  # the address exists: only the headers can tell
        code, reply = smtp.data(message("To: someone@example.org", "Subject: no key anywhere"))
    assert code == 550 and b"We couldn't figure out what the email is for" in reply
    assert not front_door.postfix.queue_ids()
    assert "non-delivery notification" not in front_door.postfix.maillog_text()
    assert not front_door.postfix.bounces() and not front_door.jobs()
    # a reply with the key in its References still goes through, to the right issue
    refs = f"References: <reply-{REPLY_KEY}@gitlab.test> <note_1@gitlab.test>"
    front_door.send(DEDICATED, message("To: someone@example.org", refs, "Subject: Re: x", "Message-ID: <d1@x>"))
    (job,) = front_door.wait_jobs(1)
    assert job["class"] == "EmailReceiverWorker" and not front_door.postfix.bounces()


def test_a_refused_recipient_among_good_ones_is_removed_before_queueing(start_front_door: StartFrontDoor) -> None:
    """The Service Desk's dedicated address has no key in this mail, the reply address has one: the message is
    taken for the reply address only, and nobody gets a bounce."""
    support = f"support@{DOMAIN}"
    front_door = start_front_door(service_desk_email={"address": support})
    with smtplib.SMTP(front_door.postfix.host, front_door.postfix.port, timeout=30) as smtp:
        refused = smtp.sendmail("alice@example.org", [support, REPLY], message("Subject: two", "Message-ID: <m2@x>"))
    assert refused == {}  # taken, for the good recipient
    (job,) = front_door.wait_jobs(1)
    assert job["class"] == "EmailReceiverWorker" and f"Delivered-To: {REPLY}" in job["args"][0]
    front_door.postfix.wait_queue_empty()
    assert not front_door.postfix.bounces()
    assert f"to=<{support}>" not in front_door.postfix.maillog_text()  # removed before queueing: never delivered


def test_gitlabs_own_notifications_still_go_out_through_this_postfix(
    start_front_door: StartFrontDoor, tmp_path: Path
) -> None:
    """A Postfix that also relays GitLab's outgoing mail (from GitLab's host, in mynetworks) keeps doing so with the
    generated fragments; a stranger still cannot relay."""
    from aiosmtpd.controller import Controller

    from tests.servers.postfix import GITLAB_HOST_ADDRESS

    class Smarthost:
        def __init__(self) -> None:
            self.received: list[tuple[str, list[str]]] = []

        async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
            self.received.append((envelope.mail_from, list(envelope.rcpt_tos)))
            return "250 2.0.0 Ok"

    smarthost = Smarthost()
    relay = Controller(smarthost, hostname="127.0.0.1", port=free_port())
    relay.start()
    try:
        front_door = start_front_door()
        front_door.postfix.set_relayhost(f"[127.0.0.1]:{relay.port}")
        with smtplib.SMTP(front_door.postfix.host, front_door.postfix.port, timeout=30,
                          source_address=(GITLAB_HOST_ADDRESS, 0)) as smtp:  # fmt: skip
            smtp.sendmail("gitlab@gitlab.test", ["user@elsewhere.example"], message("Subject: [GitLab] note"))
        wait_until(lambda: smarthost.received, timeout=60, what="the notification relayed")
        assert smarthost.received == [("gitlab@gitlab.test", ["user@elsewhere.example"])]
        with smtplib.SMTP(front_door.postfix.host, front_door.postfix.port, timeout=30) as smtp:
            smtp.ehlo("stranger.example.org")
            smtp.mail("spammer@stranger.example")
            assert smtp.rcpt("victim@elsewhere.example")[0] in (454, 554)  # relay access denied
    finally:
        relay.stop()
