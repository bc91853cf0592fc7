"""`lmtp-gateway explain`, run as an admin runs it: the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO

EXAMPLES = REPO / "lmtp_gateway" / "examples"


def lmtp_gateway() -> str:
    found = shutil.which("lmtp-gateway", path=str(Path(sys.executable).parent)) or shutil.which("lmtp-gateway")
    assert found, "the console script lmtp-gateway is not installed: pip install -e ."
    return found


def explain(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([lmtp_gateway(), "explain", *args], input=stdin, capture_output=True, timeout=60, check=False)


def explain_json(*args: str, stdin: bytes | None = None) -> dict[str, Any]:
    done = explain("--json", *args, stdin=stdin)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def test_human_output_lists_every_candidate_and_the_verdict() -> None:
    done = explain(str(EXAMPLES / "reply.eml"))
    out = done.stdout.decode()
    assert done.returncode == 0
    assert "to  incoming+59d8df8370b7e95c5a49fbf86aeb2c93@localhost" in out
    assert "verdict: DELIVER" in out and "handler: create_note" in out


def test_json_fields_per_verdict() -> None:
    assert set(explain_json(str(EXAMPLES / "reply.eml"))) == {
        "verdict",
        "mailbox",
        "key",
        "handler",
        "source",
        "reason",
    }
    assert explain_json(str(EXAMPLES / "auto-reply.eml"))["verdict"] == "drop"
    rejected = explain_json(str(EXAMPLES / "bcc.eml"))
    assert set(rejected) == {"verdict", "reason"} and rejected["verdict"] == "reject"


def test_stdin_and_envelope() -> None:
    raw = (EXAMPLES / "bcc.eml").read_bytes()
    verdict = explain_json("--rcpt", "contact+slug-key@localhost", "-", stdin=raw)
    # GitLab reads the copy: the address is in the Delivered-To the gateway puts before it
    assert verdict["source"] == "delivered_to" and verdict["mailbox"] == "service_desk_email"


def test_unusable_input_exits_non_zero(tmp_path: Path) -> None:
    missing = explain(str(tmp_path / "none.eml"))
    assert missing.returncode != 0 and b"none.eml" in missing.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text("incoming_email:\n  address: x@%{key}\n")
    broken = explain("--config", str(bad), str(EXAMPLES / "reply.eml"))
    assert broken.returncode != 0
    assert b"bad.yml: incoming_email.address" in broken.stderr


def test_mailbox_not_configured(tmp_path: Path) -> None:
    only = tmp_path / "gw.yml"
    only.write_text('incoming_email:\n  address: "in+%{key}@h"\n')
    done = explain("--config", str(only), "--mailbox", "service_desk_email", str(EXAMPLES / "reply.eml"))
    assert done.returncode != 0 and b"not configured" in done.stderr


def test_a_copy_gitlab_routes_elsewhere_is_said_in_plain_words(tmp_path: Path) -> None:
    message = tmp_path / "two.eml"
    message.write_bytes(b"To: incoming+59d8df8370b7e95c5a49fbf86aeb2c93@localhost\r\nSubject: x\r\n\r\nbody\r\n")
    rcpt = "incoming+gitlab-org-gitlab-20-Tok3n-issue@localhost"
    done = explain("--rcpt", rcpt, str(message))
    assert f"note:    sent to {rcpt}, but GitLab will route this copy by to to key '59d8" in done.stdout.decode()


def test_read_only_commands_need_none_of_the_services_secrets(tmp_path: Path) -> None:
    """After `config import`, the passwords are variables set in the service's environment only."""
    config = tmp_path / "gw.yml"
    config.write_text('incoming_email:\n  address: "incoming+%{key}@localhost"\n  host: imap.example.org\n'
                      f"  user: u\n  password_env: NOT_SET_HERE\nspool:\n  path: {tmp_path / 'spool'}\n")  # fmt: skip
    assert explain("--config", str(config), str(EXAMPLES / "reply.eml")).returncode == 0
    for command in (["spool", "list"], ["spool", "stats"], ["postfix-config"]):
        done = subprocess.run([lmtp_gateway(), *command, "--config", str(config)], capture_output=True, timeout=60)
        assert done.returncode == 0, (command, done.stderr)
