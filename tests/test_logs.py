"""Logs: JSON lines with the facts an admin greps for, never a secret or a body; syslog priorities under journald."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmtp_gateway.logs import JsonFormatter
from tests.conftest import (
    REPLY_RCPT,
    StartGateway,
    eventually,
    gateway_yaml,
    lmtp_gateway_command,
    mailroom_secret_file,
    make_config,
    message,
)
from tests.gitlab_stub import GitLabStub

KEY = os.urandom(32)
PASSWORD = "redis-Pa55-never-logged"
BODY_MARK = "BODY-TEXT-never-logged-4711"
DESK_RCPT = "contact+project_slug-project_key@incoming.test"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Everything logged, at debug level, through the formatter serve uses for JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_a_full_delivery_logs_its_facts_and_no_secret_or_body(
    start_gateway: StartGateway, redis: Any, captured: io.StringIO, tmp_path: Path
) -> None:
    gitlab = GitLabStub(KEY, scripted=[500]).start()  # one deferral, so the retry path is logged too
    secret = mailroom_secret_file(tmp_path, KEY)
    redis.command("ACL", "SETUSER", "gateway", "on", f">{PASSWORD}", "~*", "&*", "+@all")
    try:
        config = make_config(
            tmp_path / "spool",
            gitlab={"url": gitlab.url},
            incoming_email={"delivery_method": "sidekiq"},
            service_desk_email={"delivery_method": "webhook", "secret_file": str(secret)},
            redis={"url": f"redis://gateway:{PASSWORD}@127.0.0.1:{redis.port}/0"},
        )
        gateway = await start_gateway(config, backoff_base=0.05)
        client = await gateway.client()
        raw = message("From: alice@example.org", f"To: {REPLY_RCPT}", "Subject: hello", body=f"{BODY_MARK}\n")
        done = await client.send("alice@example.org", [REPLY_RCPT, DESK_RCPT], raw)
        await client.quit()
        assert [r[:3] for r in done.results] == ["250", "250"]
        await eventually(lambda: gateway.gateway.dispatcher.stats.delivered == 2, what="both delivered")
        await gateway.stop()
    finally:
        redis.command("ACL", "DELUSER", "gateway")
        gitlab.stop()

    text = captured.getvalue()
    for secret_text in (PASSWORD, base64.b64encode(KEY).decode(), "eyJ", BODY_MARK):  # eyJ: how every JWT begins
        assert secret_text not in text, f"{secret_text!r} was logged"
    records = [json.loads(line) for line in text.splitlines()]  # one JSON object per line, every line
    events = [record.get("event") for record in records]
    # One info line per delivered copy (the commit is a debug line), a warning for the retry.
    assert events.count("delivered") == 2 and "deferred" in events
    assert not [r for r in records if r.get("event") == "accepted" and r["level"] != "debug"]
    delivered = next(r for r in records if r.get("event") == "delivered" and r["sink"] == "sidekiq")
    assert delivered["mailbox"] == "incoming_email" and delivered["rcpt"] == REPLY_RCPT
    assert delivered["key"] and len(delivered["journal_id"]) == 24 and isinstance(delivered["latency_ms"], float)
    assert (delivered["mail_from"], delivered["handler"], delivered["ingress"]) == (
        "alice@example.org",
        "create_note",
        "lmtp",
    )
    deferred = next(r for r in records if r.get("event") == "deferred")
    assert deferred["sink"] == "webhook" and deferred["level"] == "warning"


def run_logging(env: dict[str, str], stderr_path: Path) -> str:
    """A process that logs one info and one warning line through setup_logging, its stderr in a file."""
    code = (
        "import logging; from lmtp_gateway.logs import setup_logging; setup_logging(); "
        "log = logging.getLogger('t'); log.info('hello', extra={'event': 'x'}); log.warning('careful')"
    )
    with open(stderr_path, "wb") as stderr:
        subprocess.run([sys.executable, "-c", code], env=env, stderr=stderr, check=True, timeout=30)
    return stderr_path.read_text()


def journal_stream_of(path: Path) -> str:
    status = os.stat(path)
    return f"{status.st_dev}:{status.st_ino}"


def test_priorities_only_when_stderr_is_the_journal_stream(tmp_path: Path) -> None:
    target = tmp_path / "stderr"
    target.touch()
    env = {**os.environ, "JOURNAL_STREAM": journal_stream_of(target)}
    info, warning = run_logging(env, target).splitlines()
    assert info.startswith('<6>{"time"') and json.loads(info[3:])["event"] == "x"
    assert warning.startswith("<4>{") and json.loads(warning[3:])["message"] == "careful"
    elsewhere = tmp_path / "other"
    elsewhere.touch()
    env["JOURNAL_STREAM"] = journal_stream_of(elsewhere)  # inherited from a parent whose stderr went elsewhere
    assert all(line.startswith("{") for line in run_logging(env, target).splitlines())


def test_serve_under_systemd_prefixes_its_lines(tmp_path: Path) -> None:
    config = tmp_path / "gw.yml"
    config.write_text(yaml.safe_dump(gateway_yaml(tmp_path / "spool")))
    log = tmp_path / "serve.log"
    log.touch()
    env = {**os.environ, "JOURNAL_STREAM": journal_stream_of(log)}
    with open(log, "wb") as stderr:
        serve = subprocess.Popen([*lmtp_gateway_command(), "serve", "--config", str(config)], env=env, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while '"event": "listening"' not in log.read_text():
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    json_lines = [line for line in log.read_text().splitlines() if "{" in line]
    assert json_lines and all(line.startswith("<6>{") for line in json_lines)
