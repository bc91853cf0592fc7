"""Mail in any charset reaches GitLab decodable to the sender's text (docs/gitlab-rules.md §8).

First what the conversion does to a message, then the whole way for real: Postfix's side over LMTP, the gateway's
Sidekiq job in a real Redis (or the webhook, which GitLab turns into the same job), a real Sidekiq running workers
named as GitLab's, and the mail gem reading what they receive.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtp_gateway.eightbit import for_gitlab, is_utf8
from lmtp_gateway.headers import read_header
from tests.conftest import REPLY_RCPT, StartGateway, eventually, mailroom_secret_file, make_config
from tests.gitlab_stub import GitLabStub
from tests.servers.sidekiq import SidekiqServer

GREETING = "Grüße aus Köln"
LATIN1 = GREETING.encode("latin-1")


def latin1_message(*, cte: str = "8bit", charset: str | None = "iso-8859-1", subject: bytes = b"K\xf6ln") -> bytes:
    content_type = f"Content-Type: text/plain; charset={charset}\r\n" if charset else ""
    return (
        f"From: a@example.org\r\nTo: {REPLY_RCPT}\r\n".encode()
        + b"Subject: " + subject + b"\r\nMIME-Version: 1.0\r\n"
        + content_type.encode() + f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode()
        + LATIN1 + b"\r\n"
    )  # fmt: skip


def multipart_message() -> bytes:
    return (
        f"From: a@example.org\r\nTo: {REPLY_RCPT}\r\nSubject: both\r\nMIME-Version: 1.0\r\n".encode()
        + b'Content-Type: multipart/alternative; boundary="b1"\r\n\r\npreamble \xe4\r\n'
        + b"--b1\r\nContent-Type: text/plain; charset=iso-8859-15\r\n\r\n" + LATIN1 + b"\r\n"
        + b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>" + GREETING.encode() + b"</p>\r\n"
        + b"--b1--\r\n"
    )  # fmt: skip


UTF8_MESSAGE = latin1_message(charset="utf-8", subject="Köln".encode()).replace(LATIN1, GREETING.encode())


# --- the conversion ---


def test_utf8_passes_byte_for_byte() -> None:
    raw = f"To: {REPLY_RCPT}\r\nSubject: {GREETING}\r\n\r\n{GREETING}\r\n".encode()
    assert for_gitlab(raw) is raw


def test_an_8bit_part_becomes_quoted_printable_with_its_charset() -> None:
    converted = for_gitlab(latin1_message())
    assert is_utf8(converted) and converted.isascii() is False  # the subject is UTF-8 now
    assert b"Content-Type: text/plain; charset=iso-8859-1\r\n" in converted
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in converted
    body = converted.split(b"\r\n\r\n", 1)[1]
    assert binascii.a2b_qp(body).decode("iso-8859-1") == GREETING + "\r\n"
    assert read_header(converted).values("Subject") == ["Köln"]


def test_other_parts_and_the_routing_headers_stay_as_they_were() -> None:
    raw = multipart_message()
    converted = for_gitlab(raw)
    assert converted.count(b"--b1") == 3
    assert f"<p>{GREETING}</p>".encode() in converted  # the UTF-8 part is untouched
    assert converted.startswith(raw[: raw.index(b"preamble")])  # so is everything before the first change


def test_quoted_printable_and_base64_parts_decode_to_the_same_bytes() -> None:
    qp = latin1_message(cte="quoted-printable").replace(LATIN1, b"Gr\xfc=DFe")
    assert binascii.a2b_qp(for_gitlab(qp).split(b"\r\n\r\n", 1)[1]) == b"Gr\xfc\xdfe\r\n"
    b64 = latin1_message(cte="base64").replace(LATIN1, base64.b64encode(LATIN1)[:8] + b"\xff" + base64.b64encode(
        LATIN1)[8:])  # fmt: skip
    assert base64.b64decode(for_gitlab(b64).split(b"\r\n\r\n", 1)[1]) == LATIN1


def test_a_message_that_declares_no_charset_is_read_as_windows_1252() -> None:
    raw = f"From: a@example.org\r\nTo: {REPLY_RCPT}\r\nSubject: x\r\n\r\n".encode() + LATIN1 + b"\r\n"
    converted = for_gitlab(raw)
    assert b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=windows-1252\r\n" in converted


def test_leading_white_space_is_taken_off() -> None:
    assert for_gitlab(b"\r\n\r\n  To: a@b\r\n\r\nx") == b"To: a@b\r\n\r\nx"


@settings(max_examples=300)
@given(st.binary(max_size=3000))
def test_any_bytes_become_utf8(raw: bytes) -> None:
    assert is_utf8(for_gitlab(raw))


# --- the whole way, for real ---


@pytest.fixture
def sidekiq(redis: Any) -> Iterator[SidekiqServer]:
    server = SidekiqServer(redis).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        pytest.param(latin1_message(), GREETING, id="8bit-iso-8859-1"),
        pytest.param(latin1_message(charset=None), GREETING, id="8bit-no-charset"),
        pytest.param(multipart_message(), GREETING, id="multipart"),
        pytest.param(UTF8_MESSAGE, GREETING, id="utf-8"),
    ],
)
async def test_gitlabs_worker_reads_the_senders_text(
    start_gateway: StartGateway, redis: Any, sidekiq: SidekiqServer, tmp_path: Path, raw: bytes, text: str
) -> None:
    config = make_config(
        tmp_path / "spool", incoming_email={"delivery_method": "sidekiq"}, redis={"url": redis.url}
    )
    gateway = await start_gateway(config)
    client = await gateway.client()
    done = await client.send("a@example.org", [REPLY_RCPT], raw)
    await client.quit()
    assert done.results[0].startswith("250 2.0.0")
    (seen,) = await eventually(sidekiq.received, timeout=60, what="the worker ran")
    assert seen["worker"] == "EmailReceiverWorker" and seen["utf8"]
    assert seen["text"].replace("\r\n", "\n").strip() == text
    assert seen["to"] == [REPLY_RCPT]
    assert "\ufffd" not in seen["text"] and "ï¿½" not in seen["text"]


async def test_the_webhook_reaches_the_same_worker_the_same_way(
    start_gateway: StartGateway, redis: Any, sidekiq: SidekiqServer, tmp_path: Path
) -> None:
    key = b"k" * 32
    gitlab = GitLabStub(key, queue_redis=redis).start()
    try:
        config = make_config(
            tmp_path / "spool",
            gitlab={"url": gitlab.url},
            incoming_email={"delivery_method": "webhook", "secret_file": str(mailroom_secret_file(tmp_path, key))},
            service_desk_email=None,
        )
        gateway = await start_gateway(config)
        client = await gateway.client()
        await client.send("a@example.org", [REPLY_RCPT], latin1_message())
        await client.quit()
        (seen,) = await eventually(sidekiq.received, timeout=60, what="the worker ran")
    finally:
        gitlab.stop()
    assert seen["text"].replace("\r\n", "\n").strip() == GREETING and seen["subject"] == "Köln"
