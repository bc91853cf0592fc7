"""Every command the documentation (README.md and docs/*.md) shows in a ```sh block runs, as shown, from a fresh
checkout; every relative link leads somewhere.

The convention for fenced blocks:

- ```sh: commands that run anywhere, from the repository root, with no daemon running and nothing root-only:
  they point at files in the repository (contrib/config/examples/*.yml, contrib/config/examples/gitlab.rb,
  lmtp_gateway/examples/*.eml). Every line runs: each `lmtp-gateway ...` line in
  test_commands_that_need_no_daemon (in order, one fresh state directory per file), and the quick start's
  `smtp-source ...` line in test_quick_start_serve_and_smtp_source, against the `lmtp-gateway serve` it starts.
  A ```sh line of any other kind, or one that starts a daemon, fails test_sh_blocks_hold_only_runnable_commands.
- ```console: commands for a production host (root, systemd, `gitlab-ctl`, Postfix, a running daemon, the host's
  own files such as /etc/gitlab/gitlab.rb): shown, never run.
- ```yaml, ```ruby, ```text: configuration and output, never run.
"""

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
from prometheus_client import generate_latest

from lmtp_gateway.metrics import Metrics
from lmtp_gateway.workers import supervisor_metrics
from tests.conftest import REPO, lmtp_gateway_command
from tests.servers import require_binary, wait_until

README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
DAEMONS = ("serve", "collect", "policy", "milter")  # run until stopped: ```console, never ```sh


def fenced(path: Path, language: str) -> list[str]:
    """The lines of the ```language blocks of `path`, without blank lines and trailing `  # comments`."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), re.DOTALL | re.MULTILINE)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def shell_lines(path: Path = README) -> list[str]:
    return fenced(path, "sh")


def gateway_lines(path: Path) -> list[str]:
    return [line for line in shell_lines(path) if line.startswith("lmtp-gateway ")]


def name(path: Path) -> str:
    return str(path.relative_to(REPO))


def run(line: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Through a shell, as typed, with the installed lmtp-gateway first on PATH."""
    return subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean state directory: the embedded default keeps its journal in $XDG_STATE_HOME. $STATE_DIRECTORY points
    there too, so a host with the service's own journal (/var/lib/lmtp-gateway) is never touched."""
    path = f"{Path(lmtp_gateway_command()[0]).parent}:{os.environ['PATH']}:/usr/sbin"
    state = tmp_path / "state"
    return {
        **os.environ,
        "PATH": path,
        "XDG_STATE_HOME": str(state),
        "STATE_DIRECTORY": str(state / "lmtp-gateway"),
        "LMTP_GATEWAY_CONFIG": "",
    }


def test_sh_blocks_hold_only_runnable_commands() -> None:
    for path in DOCS:
        for line in shell_lines(path):
            words = line.split()
            assert words[0] in ("lmtp-gateway", "smtp-source"), (
                f"{name(path)}: {line!r} in a ```sh block is never run; use ```console for it"
            )
            if words[0] == "lmtp-gateway":
                assert words[1] not in DAEMONS, f"{name(path)}: {line!r} runs until stopped; use ```console"
    (send,) = [line for line in shell_lines() if line.startswith("smtp-source")]
    assert [name(p) for p in DOCS if any(line.startswith("smtp-source") for line in shell_lines(p))] == ["README.md"]
    assert send.endswith("127.0.0.1:2424")


@pytest.mark.parametrize("path", [p for p in DOCS if gateway_lines(p)], ids=name)
def test_commands_that_need_no_daemon(path: Path, env: dict[str, str]) -> None:
    for line in gateway_lines(path):
        done = run(line, env)
        assert done.returncode == 0, f"{name(path)}: {line}\n{done.stdout}\n{done.stderr}"


def test_every_page_is_exercised() -> None:
    assert len(gateway_lines(README)) >= 3
    assert sum(len(gateway_lines(path)) for path in DOCS) >= 20
    for page in ("configuration", "operations", "postfix", "collectors", "migrating-from-mail_room"):
        assert gateway_lines(REPO / "docs" / f"{page}.md"), f"docs/{page}.md shows no runnable command"


def test_quick_start_serve_and_smtp_source(env: dict[str, str], tmp_path: Path) -> None:
    assert "lmtp-gateway serve" in fenced(README, "console"), "the quick start shows `lmtp-gateway serve`"
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
        (listing_line,) = [line for line in shell_lines() if line.startswith("lmtp-gateway spool list")]
        listing = run(listing_line, env)
        assert "delivered" in listing.stdout and "create_note" in listing.stdout
        with urllib.request.urlopen("http://127.0.0.1:9425/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert 'lmtp_gateway_delivered_total{mailbox="incoming_email",sink="maildir"} 1.0' in metrics
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0


def test_the_test_command_and_its_debian_packages() -> None:
    """The README's test command is what CI runs, and it names exactly the packages scripts/test installs."""
    assert "./scripts/test" in fenced(README, "console")
    assert "./scripts/test" in (REPO / ".ci" / "run").read_text()
    script = (REPO / "scripts" / "test").read_text()
    (array,) = re.findall(r"^DEBIAN_PACKAGES=\((.*?)\)", script, re.DOTALL | re.MULTILINE)
    installed = set(array.split())
    text = " ".join(README.read_text().split())
    (sentence,) = re.findall(r"`\./scripts/test` installs the Debian packages (.*?) creates `\.venv`", text)
    named = set(re.findall(r"`([a-z0-9.+-]+)`", sentence))
    assert named == installed, f"README names {sorted(named)}, scripts/test installs {sorted(installed)}"


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
    return {slug(heading) for heading in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}


def test_relative_links_lead_somewhere() -> None:
    for path in [*DOCS, REPO / "CHANGELOG.md"]:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.exists(), f"{name(path)}: link to {target}: no such file"
            assert REPO in linked.parents or linked == REPO, f"{name(path)}: link to {target} leaves the repository"
            if anchor:
                assert anchor in anchors(linked), f"{name(path)}: link to {target}: no such heading"


def test_documented_shell_completion_works(env: dict[str, str]) -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    shells = re.findall(r"_LMTP_GATEWAY_COMPLETE=(\w+)_source lmtp-gateway", text)
    assert sorted(shells) == ["bash", "fish", "zsh"]
    for shell in shells:
        done = run(f"_LMTP_GATEWAY_COMPLETE={shell}_source lmtp-gateway", env)
        assert done.returncode == 0 and "_lmtp_gateway_completion" in done.stdout, f"{shell}: {done.stderr}"


def test_documented_metrics_exist() -> None:
    """Every lmtp_gateway_* name the documentation mentions is one /metrics serves."""
    supervisor, _ = supervisor_metrics(2, lambda: 2)  # `serve` with several workers adds these
    texts = (Metrics().render(), generate_latest(supervisor))
    served = {line.split()[2] for text in texts for line in text.decode().splitlines() if line.startswith("# TYPE ")}
    served |= {f"{metric}{suffix}" for metric in served for suffix in ("_bucket", "_count", "_sum")}
    for path in DOCS:
        for metric in set(re.findall(r"\blmtp_gateway_[a-z_]+[a-z]", path.read_text())):
            assert metric in served, f"{name(path)}: {metric} is no metric the gateway serves"
