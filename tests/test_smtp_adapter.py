"""What the LMTP session relies on in aiosmtpd's and asyncio's internals (lmtp_gateway/smtp_adapter.py), pinned
one by one against the installed versions: an upgrade that changes any of them fails here, by name."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtp_gateway.ingress import MAIL_LINE_LIMIT
from lmtp_gateway.smtp_adapter import PLAIN_PATH, LmtpAdapter, unread
from tests.conftest import REPLY_RCPT, StartGateway
from tests.lmtp_client import LmtpClient


def test_the_installed_aiosmtpd_is_the_one_pinned_here() -> None:
    assert aiosmtpd.__version__.startswith("1.4."), "re-read smtp_adapter.py against this aiosmtpd, then update"
    assert SMTP.command_size_limit == 512


async def test_command_limits_belong_to_one_session() -> None:
    first, second = LmtpAdapter(handler=object()), LmtpAdapter(handler=object())
    first.set_command_limit("MAIL", MAIL_LINE_LIMIT)
    third = LmtpAdapter(handler=object())  # aiosmtpd clears its class-wide dict here
    assert first.command_limit("MAIL") == MAIL_LINE_LIMIT
    assert second.command_limit("MAIL") == third.command_limit("MAIL") == 512


async def test_a_mail_line_is_judged_alone_whoever_else_connects(start_gateway: StartGateway) -> None:
    """A 540-byte MAIL line (SIZE= and SMTPUTF8 allow it) is accepted, also after another client connected."""
    gateway = await start_gateway()
    client = await gateway.client()
    other = await LmtpClient.connect(gateway.address)  # a new connection between LHLO and MAIL
    sender = "s" * 500 + "@example.org"
    answer = await client.command(f"MAIL FROM:<{sender}> SIZE=1000")
    assert answer.startswith("250"), answer
    assert (await client.command(f"MAIL FROM:<{'s' * 600}@example.org>")).startswith("500")  # and no further
    await client.quit()
    await other.quit()


async def test_unread_hands_bytes_back_in_front() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"DATA-TAILRSET\r\n")
    assert await reader.read(9) == b"DATA-TAIL"
    unread(reader, b"NOOP\r\n")
    assert await reader.readuntil(b"\r\n") == b"NOOP\r\n"
    assert await reader.readuntil(b"\r\n") == b"RSET\r\n"


async def test_transaction_resets_give_a_fresh_envelope() -> None:
    session = LmtpAdapter(handler=object())
    session.start_transaction()  # what connection_made does first
    for reset in (session.start_transaction, session.end_transaction):
        assert session.envelope is not None
        session.envelope.mail_from = "a@b"
        session.envelope.rcpt_tos.append("c@d")
        reset()
        assert session.envelope.mail_from is None and session.envelope.rcpt_tos == []


async def test_still_active_restarts_the_idle_timer() -> None:
    session = LmtpAdapter(handler=object(), timeout=300)
    session.still_active()
    first = session._timeout_handle
    session.still_active()
    assert first is not None and first.cancelled()
    assert session._timeout_handle is not None and not session._timeout_handle.cancelled()
    session._timeout_handle.cancel()


atext = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789!#$%&'*+/=?^_`{|}~.-", min_size=1, max_size=30)


@settings(max_examples=300)
@given(
    atext, st.text(alphabet="abc.-0123", min_size=1, max_size=15), st.sampled_from(["", " SIZE=100", " BODY=8BITMIME"])
)
def test_the_fast_path_parser_answers_what_aiosmtpd_answers(local: str, domain: str, params: str) -> None:
    plain = SimpleNamespace(local_part_limit=0)
    arg = f"<{local}@{domain}>{params}"
    try:
        expected = SMTP._getaddr(plain, arg)  # type: ignore[arg-type]
    except Exception:  # aiosmtpd's own parser raises on some inputs: then the fast path must hand them to it
        expected = None
    fast = PLAIN_PATH.match(arg)
    if local.strip(".") == local and ".." not in local + domain and "." not in (domain[:1], domain[-1:]):
        assert fast is not None, arg  # the common case takes the fast path: otherwise it would be pointless
    if fast is not None:
        assert expected is not None
        assert LmtpAdapter._getaddr(plain, arg) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("pipelined", [b"NOOP\r\n", b"RSET\r\nNOOP\r\n"])
async def test_commands_pipelined_after_data_are_answered(start_gateway: StartGateway, pipelined: bytes) -> None:
    gateway = await start_gateway()
    client = await gateway.client()
    client.writer.write(f"MAIL FROM:<a@example.org>\r\nRCPT TO:<{REPLY_RCPT}>\r\nDATA\r\n".encode())
    for _ in range(3):
        await client.reply()
    client.writer.write(b"Subject: x\r\n\r\nbody\r\n.\r\n" + pipelined)  # the dot and more commands, one write
    assert (await client.reply()).startswith("250 2.0.0")
    for _ in range(pipelined.count(b"\r\n")):
        assert (await client.reply()).startswith("250")
    await client.quit()
