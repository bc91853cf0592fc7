"""Self-test: the real servers start, work, restart and leave nothing behind.

If these fail, every integration test and benchmark built on
``tests.servers`` would fail for reasons unrelated to lmtp-gateway.
"""

from __future__ import annotations

import imaplib
import smtplib
import socket
from collections.abc import Iterator

import pytest

from . import free_port, group_alive, require_binary
from .dovecot import DovecotServer
from .redis import RedisServer

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: gitlab@localhost\r\n"
    b"Subject: selftest\r\n"
    b"Message-ID: <selftest@example.org>\r\n"
    b"\r\n"
    b"Hello from the server self-test.\r\n"
)


def _raw_redis(port: int, payload: bytes, reply_lines: int = 1) -> bytes:
    """Send raw RESP; return the reply once it has ``reply_lines`` CRLFs."""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(payload)
        while reply.count(b"\r\n") < reply_lines:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply


# -- helpers ----------------------------------------------------------------


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_require_binary_found() -> None:
    assert require_binary("sh", "dash").endswith("/sh")


def test_require_binary_missing_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install no-such-pkg"):
        require_binary("no-such-binary-xyz", "no-such-pkg")


def test_require_binary_missing_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(RuntimeError, match="missing under CI: install Debian package no-such-pkg"):
        require_binary("no-such-binary-xyz", "no-such-pkg")


# -- Redis ------------------------------------------------------------------


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_redis_ping_set_get(redis_server: RedisServer) -> None:
    port = redis_server.port
    assert redis_server.url == f"redis://127.0.0.1:{port}/0"
    assert _raw_redis(port, b"PING\r\n") == b"+PONG\r\n"
    assert _raw_redis(port, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n") == b"+OK\r\n"
    assert _raw_redis(port, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", 2) == b"$5\r\nhello\r\n"
    assert redis_server.command("GET", "k") == b"hello"
    assert redis_server.command("DBSIZE") == 1


def test_redis_restart_same_port(redis_server: RedisServer) -> None:
    port, url = redis_server.port, redis_server.url
    redis_server.command("SET", "k", "v")
    old_pid = redis_server.pid
    assert old_pid is not None

    redis_server.restart(downtime=0.2)

    assert (redis_server.port, redis_server.url) == (port, url)
    assert redis_server.pid not in (None, old_pid)
    assert redis_server.ping()
    assert redis_server.command("GET", "k") is None  # no persistence
    redis_server.command("SET", "k", "again")
    assert redis_server.command("GET", "k") == b"again"


def test_redis_down_between_stop_and_start() -> None:
    server = RedisServer()
    server.start()
    port = server.port
    server.stop(graceful=False)
    assert not server.ping()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    server.start()
    try:
        assert server.port == port
        assert server.ping()
    finally:
        server.stop()


def test_redis_stop_is_idempotent_and_leaves_nothing() -> None:
    server = RedisServer().start()
    pid = server.pid
    tmpdir = server.tmpdir
    assert pid is not None
    server.stop()
    server.stop()
    assert not server.running
    assert not group_alive(pid)
    assert not tmpdir.exists()


# -- Dovecot ----------------------------------------------------------------


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotServer]:
    with DovecotServer(users={"gitlab": "secret", "other": "pw2"}) as server:
        yield server


def test_dovecot_lmtp_delivery_and_imap(dovecot: DovecotServer) -> None:
    assert (dovecot.user, dovecot.password) == ("gitlab", "secret")
    other_before = len(list((dovecot.maildir("other") / "new").iterdir()))
    lmtp = smtplib.LMTP(dovecot.host, dovecot.lmtp_port)
    try:
        assert lmtp.ehlo("selftest")[0] == 250  # smtplib.LMTP sends this as LHLO
        assert lmtp.does_esmtp
        assert lmtp.mail("alice@example.org")[0] == 250
        assert lmtp.rcpt("gitlab@localhost")[0] == 250
        assert lmtp.data(MESSAGE)[0] == 250
    finally:
        lmtp.quit()

    new = list((dovecot.maildir("gitlab") / "new").iterdir())
    assert len(new) == 1
    assert b"Subject: selftest" in new[0].read_bytes()
    assert len(list((dovecot.maildir("other") / "new").iterdir())) == other_before

    imap = imaplib.IMAP4(dovecot.host, dovecot.imap_port)
    try:
        assert imap.login(dovecot.user, dovecot.password)[0] == "OK"
        status, data = imap.select("INBOX")
        assert (status, data) == ("OK", [b"1"])
    finally:
        imap.logout()


def test_dovecot_recipient_forms(dovecot: DovecotServer) -> None:
    """Domain ignored, local part case-insensitive, +detail to INBOX.

    One recipient per transaction: smtplib.LMTP reads only the first of
    LMTP's per-recipient DATA replies, so several RCPTs desync it.
    """
    new = dovecot.maildir("other") / "new"
    before = len(list(new.iterdir()))
    accepted = ["other@localhost", "Other@example.com", "other+reply-123@anything.test"]
    with smtplib.LMTP(dovecot.host, dovecot.lmtp_port) as lmtp:
        for rcpt in accepted:
            assert lmtp.sendmail("alice@example.org", [rcpt], MESSAGE) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as excinfo:
            lmtp.sendmail("alice@example.org", ["nobody@localhost"], MESSAGE)
        assert excinfo.value.recipients["nobody@localhost"][0] == 550
    assert len(list(new.iterdir())) == before + len(accepted)


def test_dovecot_catch_all_and_stop() -> None:
    server = DovecotServer(catch_all=True).start()
    tmpdir = server.tmpdir
    pgid = server.pid
    assert pgid is not None
    try:
        with smtplib.LMTP(server.host, server.lmtp_port) as lmtp:
            assert lmtp.sendmail("a@example.org", ["whoever@some.domain"], MESSAGE) == {}
        assert len(list((server.maildir() / "new").iterdir())) == 1
    finally:
        server.stop(graceful=False)
    server.stop()
    assert not server.running
    assert not group_alive(pgid)
    assert not tmpdir.exists()
