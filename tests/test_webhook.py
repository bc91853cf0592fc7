"""Delivery through GitLab's internal mail_room API, against a stand-in that checks the JWT as GitLab does."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from lmtp_gateway.errors import ConfigError
from lmtp_gateway.journal import State
from lmtp_gateway.sinks import read_webhook_key, webhook_token
from tests.conftest import REPLY_RCPT, StartGateway, eventually, mailroom_secret_file, make_config, numbered_message
from tests.gitlab_stub import GitLabStub

KEY = os.urandom(32)


@pytest.fixture
def gitlab() -> Iterator[GitLabStub]:
    stub = GitLabStub(KEY).start()
    yield stub
    stub.stop()


def secret_file(tmp_path: Path, key: bytes = KEY, mode: int = 0o600) -> Path:
    return mailroom_secret_file(tmp_path, key, mode)


def webhook_config(tmp_path: Path, gitlab: GitLabStub, secret: Path) -> object:
    return make_config(
        tmp_path / "spool",
        gitlab={"url": gitlab.url},
        incoming_email={"delivery_method": "webhook", "secret_file": str(secret)},
        service_desk_email=None,
    )


def states(tmp_path: Path, state: State) -> list[Path]:
    return list((tmp_path / "spool" / state.value).glob("*.json"))


def test_token_claims() -> None:
    claims = jwt.decode(webhook_token(KEY, now=1_700_000_000), KEY, algorithms=["HS256"], options={"verify_iat": False})
    assert claims["iss"] == "gitlab-mailroom" and claims["iat"] == 1_700_000_000 and len(claims["nonce"]) >= 16
    assert jwt.get_unverified_header(webhook_token(KEY))["alg"] == "HS256"


def test_secret_file_rules(tmp_path: Path) -> None:
    assert read_webhook_key(secret_file(tmp_path)) == KEY
    with pytest.raises(ConfigError, match="world-readable; fix with: chmod 600"):
        read_webhook_key(secret_file(tmp_path, mode=0o644))
    with pytest.raises(ConfigError, match="decodes to 16 bytes; GitLab needs exactly 32"):
        read_webhook_key(secret_file(tmp_path, key=os.urandom(16)))


async def test_delivered_with_a_token_gitlab_accepts(
    start_gateway: StartGateway, gitlab: GitLabStub, tmp_path: Path
) -> None:
    gateway = await start_gateway(webhook_config(tmp_path, gitlab, secret_file(tmp_path)))
    client = await gateway.client()
    raw = numbered_message(1)
    done = await client.send("a@example.org", [REPLY_RCPT], raw)
    await client.quit()
    assert done.results[0].startswith("250 2.0.0")
    await eventually(lambda: states(tmp_path, State.DELIVERED), what="delivery")
    (received,) = gitlab.received
    assert received.mailbox == "incoming_email" and received.content_type == "text/plain"
    assert received.body.endswith(raw.replace(b"\n", b"\r\n"))
    assert abs(int(received.claims["iat"]) - time.time()) < 60


async def test_400_is_a_dead_letter_and_5xx_is_retried(
    start_gateway: StartGateway, gitlab: GitLabStub, tmp_path: Path
) -> None:
    gitlab.max_size = 800
    gitlab.scripted = [502, 500]
    gateway = await start_gateway(webhook_config(tmp_path, gitlab, secret_file(tmp_path)), backoff_base=0.05)
    client = await gateway.client()
    await client.send("a@example.org", [REPLY_RCPT], numbered_message(1))  # small: 502, 500, then 200
    await client.send("a@example.org", [REPLY_RCPT], numbered_message(2, body="x\n" * 500))  # too large: 400
    await client.quit()
    await eventually(lambda: len(states(tmp_path, State.DELIVERED)) == 1 and states(tmp_path, State.FAILED),
                     what="one delivered, one failed")  # fmt: skip
    assert len(gitlab.received) == 1 and b"message 1" in gitlab.received[0].body
    failed = (tmp_path / "spool" / "failed").glob("*.json")
    assert "400" in next(failed).read_text()
    assert gateway.gateway.dispatcher.stats.transient >= 2


async def test_wrong_secret_keeps_the_mail(start_gateway: StartGateway, gitlab: GitLabStub, tmp_path: Path) -> None:
    wrong = secret_file(tmp_path, key=os.urandom(32))
    gateway = await start_gateway(webhook_config(tmp_path, gitlab, wrong), backoff_base=0.05)
    client = await gateway.client()
    await client.send("a@example.org", [REPLY_RCPT], numbered_message(3))
    await client.quit()
    await eventually(lambda: gateway.gateway.dispatcher.stats.transient >= 2, what="retries on 401")
    (deferred,) = states(tmp_path, State.DEFERRED)  # waiting for its next attempt
    assert "401" in deferred.read_text() and not gitlab.received


async def test_a_gitlab_slower_than_the_timeout_is_counted(
    start_gateway: StartGateway, gitlab: GitLabStub, tmp_path: Path
) -> None:
    """GitLab took the message but answered after gitlab.webhook_timeout: the gateway cannot know, keeps the
    message and sends it again (at least once), and counts the timeout so an admin sees such duplicates."""
    gitlab.slow = [3.0]
    config = make_config(
        tmp_path / "spool",
        gitlab={"url": gitlab.url, "webhook_timeout": "1s"},
        incoming_email={"delivery_method": "webhook", "secret_file": str(secret_file(tmp_path))},
        service_desk_email=None,
    )
    gateway = await start_gateway(config, backoff_base=0.05)
    client = await gateway.client()
    await client.send("a@example.org", [REPLY_RCPT], numbered_message(1))
    await client.quit()
    await eventually(lambda: states(tmp_path, State.DELIVERED), timeout=60, what="delivered on the second try")
    assert len(gitlab.received) == 2
    timeouts = gateway.gateway.metrics.timeouts.labels(mailbox="incoming_email", sink="webhook")
    assert timeouts._value.get() == 1


def test_the_webhook_timeout_defaults_above_gitlabs_own(gitlab: GitLabStub, tmp_path: Path) -> None:
    config = webhook_config(tmp_path, gitlab, secret_file(tmp_path))
    assert config.webhook_timeout == 90  # type: ignore[attr-defined]
