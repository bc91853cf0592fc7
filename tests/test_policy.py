"""The policy service's answers, and the Postfix fragments it goes with."""

from __future__ import annotations

import subprocess
from pathlib import Path

from lmtp_gateway.config import load_config
from lmtp_gateway.policy import policy_action
from lmtp_gateway.postfix import render
from lmtp_gateway.rules import RoutingTable
from tests.conftest import REPLY_KEY, REPO, finishes_within, lmtp_gateway_command
from tests.servers.postfix import parse_main_cf


def ask(table: RoutingTable, recipient: str, **extra: str) -> str:
    return policy_action(table, {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                                 "recipient": recipient, **extra})  # fmt: skip


def test_answers(table: RoutingTable) -> None:
    assert ask(table, f"incoming+{REPLY_KEY}@incoming.example.com") == "DUNNO"
    assert ask(table, "contact+any-key@incoming.example.com") == "DUNNO"
    assert ask(table, "nobody@incoming.example.com").startswith("550 5.1.1 <nobody@incoming.example.com>: ")
    assert "fits no GitLab handler" in ask(table, "incoming+bad@incoming.example.com")
    assert ask(table, "someone@other.example.org") == "DUNNO"  # not ours: no opinion
    assert ask(table, "nobody@INCOMING.example.com").startswith("550")  # GitLab matches case-sensitively
    assert ask(table, "nobody@incoming.example.com", protocol_state="DATA") == "DUNNO"


def test_stdio_session_answers_each_request() -> None:
    requests = b"".join(
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=" + rcpt + b"\nsender=a@b\n\n"
        for rcpt in (b"nobody@localhost", f"incoming+{REPLY_KEY}@localhost".encode())
    )
    done = subprocess.run([*lmtp_gateway_command(), "policy", "--stdio"], input=requests, capture_output=True,
                          timeout=60, env={"LMTP_GATEWAY_CONFIG": "", "PATH": "/usr/bin:/bin"})  # fmt: skip
    answers = done.stdout.decode().split("\n\n")
    assert answers[0].startswith("action=550 5.1.1 <nobody@localhost>") and answers[1] == "action=DUNNO"


def test_postfix_directory_is_what_postfix_config_prints() -> None:
    for part in ("main", "master"):
        printed = subprocess.run(
            [*lmtp_gateway_command(), "postfix-config", "--config", "contrib/config/postfix.yml", f"--{part}-cf"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert printed == (REPO / "postfix" / f"{part}.cf").read_text(), f"regenerate postfix/{part}.cf"


def test_fragment_follows_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "gw.yml"
    path.write_text('incoming_email: {address: "incoming-%{key}@in.example.com"}\n'
                    'lmtp: {listen: "127.0.0.1:2424", max_message_size: 10M}\n')  # fmt: skip
    fragment = render(load_config(path), executable="/usr/bin/lmtp-gateway", user="gw")
    main = parse_main_cf(fragment.main_cf)
    assert main["transport_maps"] == "inline:{ in.example.com=gitlab-lmtp:inet:127.0.0.1:2424 }"
    assert main["message_size_limit"] == str(10 * 1024 * 1024)
    assert "recipient_delimiter" not in main  # a catch-all template needs no sub-addressing
    assert main["smtpd_recipient_restrictions"].endswith("check_policy_service unix:private/gitlab-policy")
    assert f"user=gw argv=/usr/bin/lmtp-gateway policy --config {path} --stdio" in fragment.master_cf


def test_a_hostile_recipient_is_answered_in_linear_time(table: RoutingTable) -> None:
    """A 60 KB key of the shape that made the handler formats backtrack (14–24 s before, per request)."""
    hostile = "incoming+" + "a-1" * 20_000 + "@incoming.example.com"
    answer = finishes_within(30, ask, table, hostile)
    assert answer.startswith("550 5.1.1") and "fits no GitLab handler" in answer
