"""contrib/: the systemd units pass `systemd-analyze verify`; every example configuration loads."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmtp_gateway.collect import build_source, is_collected
from lmtp_gateway.config import parse_config
from tests.conftest import REPO, lmtp_gateway_command
from tests.servers import require_binary

UNITS = sorted((REPO / "contrib" / "systemd").glob("*.service"))
EXAMPLES = sorted((REPO / "contrib" / "config" / "examples").glob("*.yml"))


def test_the_expected_files_are_there() -> None:
    names = [unit.name for unit in UNITS]
    assert names == [
        "lmtp-gateway-collect.service",
        "lmtp-gateway-milter.service",
        "lmtp-gateway-policy.service",
        "lmtp-gateway.service",
    ]
    assert len(EXAMPLES) == 8


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze", "systemd")
    text = unit.read_text()
    assert "ExecStart=/opt/lmtp-gateway/bin/lmtp-gateway " in text  # where scripts/install puts it
    for setting in (
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "User=lmtp-gateway",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "Type=exec",
        "MemoryDenyWriteExecute=yes",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=\n",
    ):
        assert setting in text, setting
    copy = tmp_path / unit.name  # verify needs ExecStart's binary to exist: point it at the installed one
    copy.write_text(text.replace("/opt/lmtp-gateway/bin/lmtp-gateway", lmtp_gateway_command()[0]))
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


def test_serve_and_collect_units_own_separate_journals() -> None:
    """A journal has one owner: with spool.path unset each unit's StateDirectory is its journal."""
    directories = {
        name: re.search(r"^StateDirectory=(\S+)$", (REPO / "contrib" / "systemd" / name).read_text(), re.M)[1]
        for name in ("lmtp-gateway.service", "lmtp-gateway-collect.service")
    }
    assert directories == {
        "lmtp-gateway.service": "lmtp-gateway",
        "lmtp-gateway-collect.service": "lmtp-gateway-collect",
    }


def test_serve_unit_matches_the_socket_and_journal_defaults() -> None:
    text = (REPO / "contrib" / "systemd" / "lmtp-gateway.service").read_text()
    assert "RuntimeDirectory=lmtp-gateway" in text and "StateDirectory=lmtp-gateway" in text
    assert "SupplementaryGroups=postfix" in text
    found = re.search(r"TimeoutStopSec=(\d+)s", text)
    assert found is not None
    stop = int(found[1])
    assert stop > 10  # the dispatcher's 10 s flush at SIGTERM, plus transactions in progress
    example = yaml.safe_load((REPO / "contrib" / "config" / "examples" / "postfix-subaddressing.yml").read_text())
    assert example["lmtp"]["listen"] == "unix:/run/lmtp-gateway/lmtp.sock"
    assert example["lmtp"]["socket_group"] == "postfix"


def test_sysusers_file(tmp_path: Path) -> None:
    sysusers = require_binary("systemd-sysusers", "systemd")
    path = REPO / "contrib" / "systemd" / "lmtp-gateway.sysusers.conf"
    done = subprocess.run([sysusers, "--dry-run", "--root", str(tmp_path), str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and "not a valid" not in done.stderr, done.stderr
    assert "lmtp-gateway" in done.stdout + done.stderr


def _secret_references(data: Any, found: list[tuple[dict[str, Any], str]]) -> list[tuple[dict[str, Any], str]]:
    if isinstance(data, dict):
        for key, value in data.items():
            if key.endswith(("_file", "_env")) and key != "secret_file" and not isinstance(value, dict):
                found.append((data, key))
            _secret_references(value, found)
    return found


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(example: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded as given, with each *_env variable set and each *_file made (0600) in a temporary directory."""
    data = yaml.safe_load(example.read_text())
    for holder, key in _secret_references(data, []):
        if key.endswith("_env"):
            monkeypatch.setenv(holder[key], f"value of {holder[key]}")
        elif key != "encrypted_secret_file":
            secret = tmp_path / Path(holder[key]).name
            secret.write_text("from a file\n")
            secret.chmod(0o600)
            holder[key] = str(secret)
    config = parse_config(yaml.safe_dump(data), str(example))
    assert config.mailboxes
    for mailbox in config.mailboxes.values():
        settings = mailbox.settings
        assert not [k for k in settings if k.endswith("_env") or k == "password_file"]
        if is_collected(mailbox):
            secret = settings.get("password") or settings["inbox_options"]["client_secret"]
            assert secret.startswith(("value of ", "from a file"))
            source = build_source(config, mailbox, tmp_path)  # what `collect` would start from it
            assert source.name.startswith(("imap:", "graph:"))
    text = example.read_text()
    assert not re.search(r"^\s*(password|client_secret|sentinel_password):", text, re.M), "no plain secret committed"
    assert text.startswith("#"), "each example says what it is for"
