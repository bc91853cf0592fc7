"""Every command the README shows runs, as shown, from a fresh checkout."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, lmtp_gateway_command
from tests.servers import require_binary, wait_until

README = (REPO / "README.md").read_text()


def shell_lines() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README, re.DOTALL)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def run(line: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Through a shell, as typed, with the installed lmtp-gateway first on PATH."""
    return subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean state directory: the embedded default keeps its journal in $XDG_STATE_HOME."""
    path = f"{Path(lmtp_gateway_command()[0]).parent}:{os.environ['PATH']}:/usr/sbin"
    return {**os.environ, "PATH": path, "XDG_STATE_HOME": str(tmp_path / "state"), "LMTP_GATEWAY_CONFIG": ""}


def test_readme_commands_that_need_no_daemon(env: dict[str, str]) -> None:
    lines = [line for line in shell_lines() if line.startswith("lmtp-gateway ") and " serve" not in line]
    assert len(lines) >= 6
    for line in lines:
        done = run(line, env)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"


def test_quick_start_serve_and_smtp_source(env: dict[str, str], tmp_path: Path) -> None:
    require_binary("smtp-source", "postfix")
    for port in (2424, 9425):  # LMTP and monitoring, the quick start's defaults
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} (a quick-start default) is busy on this machine")
    log = tmp_path / "serve.log"
    with log.open("wb") as stderr:
        serve = subprocess.Popen([*lmtp_gateway_command(), "serve"], cwd=REPO, env=env, stderr=stderr)
    try:
        listening = re.compile(r"listening on .*127\.0\.0\.1:2424")
        watch = {"proc": serve, "log_files": [log]}
        wait_until(lambda: bool(listening.search(log.read_text())), timeout=60, what="serve listening", **watch)
        (send,) = [line for line in shell_lines() if line.startswith("smtp-source")]
        argv = shlex.split(send)
        argv[0] = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
        assert subprocess.run(argv, capture_output=True, timeout=60).returncode == 0
        maildir = tmp_path / "state" / "lmtp-gateway" / "maildir" / "incoming_email" / "new"
        wait_until(lambda: any(maildir.glob("*")), timeout=30, what="the message in the Maildir", **watch)
        listing = run("lmtp-gateway spool list", env)
        assert "delivered" in listing.stdout and "create_note" in listing.stdout
        with urllib.request.urlopen("http://127.0.0.1:9425/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert 'lmtp_gateway_delivered_total{mailbox="incoming_email",sink="maildir"} 1.0' in metrics
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
