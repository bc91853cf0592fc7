"""Self-test: a real Postfix relays to a real LMTP server (Dovecot).

Postfix talks to the next hop exactly as it will talk to the gateway:
recipients are verified over LMTP during the SMTP session, accepted mail is
queued and handed over with the ``lmtp`` client, and retried while the next
hop is down. If these fail, the Postfix integration tests of the gateway
would fail for reasons unrelated to lmtp-gateway.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller, UnixSocketController
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import Envelope

from . import free_port, group_alive, wait_until
from .dovecot import DovecotServer
from .postfix import PostfixServer, lmtp_next_hop

DOMAIN = "incoming.test"
SIZE_LIMIT = 50_000
SENDER = "alice@example.org"


def _message(rcpt: str, marker: str, body: str = "Hello from the Postfix self-test.\r\n") -> bytes:
    return (
        f"From: Alice <{SENDER}>\r\n"
        f"To: {rcpt}\r\n"
        f"Subject: postfix selftest {marker}\r\n"
        f"Message-ID: <{marker}@example.org>\r\n"
        "\r\n"
        f"{body}"
    ).encode()


def _send(postfix: PostfixServer, rcpt: str, message: bytes) -> None:
    """Send one message like an internet MTA would (EHLO, SIZE, no auth)."""
    with smtplib.SMTP(postfix.host, postfix.port, local_hostname="sender.example.org", timeout=30) as smtp:
        assert smtp.sendmail(SENDER, [rcpt], message) == {}


def _delivered(dovecot: DovecotServer, marker: str) -> list[Path]:
    new = dovecot.maildir() / "new"
    return [path for path in new.iterdir() if marker.encode() in path.read_bytes()]


def _wait_delivered(dovecot: DovecotServer, marker: str, timeout: float = 30.0) -> bytes:
    """Poll the Maildir until the message carrying ``marker`` arrived."""
    wait_until(lambda: bool(_delivered(dovecot, marker)), timeout=timeout, what=f"delivery of {marker}")
    (path,) = _delivered(dovecot, marker)
    return path.read_bytes()


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotServer]:
    server = DovecotServer().start()
    try:
        yield server
    finally:
        server.stop(graceful=False)


@pytest.fixture
def postfix(dovecot: DovecotServer) -> Iterator[PostfixServer]:
    with PostfixServer([DOMAIN], lmtp_next_hop(dovecot.lmtp_port), message_size_limit=SIZE_LIMIT) as server:
        yield server


def test_known_recipient_is_relayed_over_lmtp(postfix: PostfixServer, dovecot: DovecotServer) -> None:
    marker = uuid.uuid4().hex
    _send(postfix, f"gitlab@{DOMAIN}", _message(f"gitlab@{DOMAIN}", marker))

    delivered = _wait_delivered(dovecot, marker)
    assert f"Subject: postfix selftest {marker}".encode() in delivered
    assert b"by mx.test (Postfix" in delivered  # Postfix's Received: header
    postfix.wait_queue_empty()
    assert postfix.wait_log(rf"to=<gitlab@{DOMAIN}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*status=sent")
    assert postfix.bounces() == []


def test_unknown_recipient_refused_at_rcpt_without_bounce(postfix: PostfixServer) -> None:
    with smtplib.SMTP(postfix.host, postfix.port, local_hostname="sender.example.org", timeout=30) as smtp:
        assert smtp.mail(SENDER)[0] == 503  # smtpd_helo_required
        assert smtp.ehlo()[0] == 250
        assert smtp.mail(SENDER)[0] == 250
        code, text = smtp.rcpt(f"unknown@{DOMAIN}")
        # First try, nothing cached: a final 550, not a 450 "try again".
        assert code == 550, text
        assert text.startswith(b"5.1.1 <unknown@incoming.test>: Recipient address rejected"), text
        assert text.endswith(b": undeliverable address: Recipient address lookup failed"), text
        assert b"127.0.0.1" not in text and b"said:" not in text  # no next-hop details leak
        # The probe, not a message: Dovecot's 550 seen by the lmtp client.
        probe = r"to=<unknown@incoming\.test>, .*status=undeliverable .*550 5\.1\.1"
        assert postfix.wait_log(probe)
        # The verification cache answers the second time: no second probe.
        assert smtp.rcpt(f"unknown@{DOMAIN}")[0] == 550
        # Not an open relay (Postfix's default relay restrictions defer: 454).
        code, text = smtp.rcpt("someone@elsewhere.test")
        assert (code, b"Relay access denied" in text) == (454, True), text

    rejects = r"NOQUEUE: reject: RCPT from .*: 550 5\.1\.1 <unknown@incoming\.test>"
    wait_until(
        lambda: len(re.findall(rejects, postfix.maillog_text())) == 2, timeout=30, what="both refusals logged"
    )
    assert len(re.findall(probe, postfix.maillog_text())) == 1
    postfix.wait_queue_empty()
    assert postfix.bounces() == []
    assert "status=bounced" not in postfix.maillog_text()


def test_unverifiable_recipient_gets_450_while_next_hop_is_down() -> None:
    """Nothing to ask: a temporary refusal (the sender retries), nothing queued."""
    with PostfixServer([DOMAIN], lmtp_next_hop(free_port())) as postfix:
        with smtplib.SMTP(postfix.host, postfix.port, timeout=30) as smtp:
            smtp.ehlo()
            assert smtp.mail(SENDER)[0] == 250
            code, text = smtp.rcpt(f"gitlab@{DOMAIN}")
        assert code == 450, text
        assert text.startswith(b"4.1.1 <gitlab@incoming.test>: Recipient address rejected: unverified address"), text
        postfix.wait_queue_empty()
        assert postfix.bounces() == []


def test_oversized_message_refused_at_smtp_time(postfix: PostfixServer, dovecot: DovecotServer) -> None:
    rcpt = f"gitlab@{DOMAIN}"
    big = _message(rcpt, uuid.uuid4().hex, body="x" * 76 + "\r\n") + b"y" * 76 * 1000 + b"\r\n"
    assert len(big) > SIZE_LIMIT

    # A client announcing SIZE (smtplib does) is refused at MAIL FROM.
    with smtplib.SMTP(postfix.host, postfix.port, timeout=30) as smtp, pytest.raises(smtplib.SMTPSenderRefused) as exc:
        smtp.sendmail(SENDER, [rcpt], big)
    assert exc.value.smtp_code == 552

    # One that does not is refused at the end of DATA.
    with smtplib.SMTP(postfix.host, postfix.port, timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail(SENDER)[0] == 250
        assert smtp.rcpt(rcpt)[0] == 250
        code, text = smtp.data(big)
    assert (code, text[:5]) == (552, b"5.3.4"), text

    postfix.wait_queue_empty()
    assert postfix.bounces() == []


def test_deferred_while_next_hop_down_then_delivered(postfix: PostfixServer, dovecot: DovecotServer) -> None:
    rcpt = f"gitlab@{DOMAIN}"
    first = uuid.uuid4().hex
    _send(postfix, rcpt, _message(rcpt, first))  # also verifies rcpt
    _wait_delivered(dovecot, first)

    up = postfix.next_hop
    postfix.set_next_hop(lmtp_next_hop(free_port()))  # nothing listens there
    marker = uuid.uuid4().hex
    _send(postfix, rcpt, _message(rcpt, marker))  # accepted: recipient known

    (entry,) = postfix.wait_deferred()
    assert entry["recipients"][0]["address"] == rcpt
    assert "Connection refused" in entry["recipients"][0]["delay_reason"]
    assert entry["queue_id"] in postfix.queue_ids()
    assert not _delivered(dovecot, marker)

    postfix.set_next_hop(up)
    postfix.flush()
    _wait_delivered(dovecot, marker)
    postfix.wait_queue_empty()
    assert postfix.bounces() == []


def test_retried_by_itself_when_the_same_next_hop_comes_back() -> None:
    """The gateway-restart case: same address, no reload, no flush."""
    lmtp = DovecotServer().start()
    try:
        with PostfixServer([DOMAIN], lmtp_next_hop(lmtp.lmtp_port)) as postfix:
            rcpt = f"gitlab@{DOMAIN}"
            first = uuid.uuid4().hex
            _send(postfix, rcpt, _message(rcpt, first))
            _wait_delivered(lmtp, first)

            lmtp.stop(graceful=False)  # keeps its ports for the next start()
            marker = uuid.uuid4().hex
            _send(postfix, rcpt, _message(rcpt, marker))
            postfix.wait_deferred()
            lmtp.start()
            _wait_delivered(lmtp, marker)  # backoff is 1-2 s
            postfix.wait_queue_empty()
    finally:
        lmtp.stop(graceful=False)


class _RefuseAtData:
    """aiosmtpd handler: every recipient exists, every message is refused."""

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        return "554 5.6.0 refused by the self-test"


class _LMTPController(Controller):
    def factory(self) -> LMTP:
        return LMTP(self.handler)


def test_refusal_after_data_bounces_and_the_dsn_stays_queued() -> None:
    """A 5xx after DATA makes a DSN to the sender; it is kept in the queue."""
    stub = _LMTPController(_RefuseAtData(), hostname="127.0.0.1", port=free_port())
    stub.start()
    try:
        with PostfixServer([DOMAIN], lmtp_next_hop(stub.port)) as postfix:
            rcpt = f"gitlab@{DOMAIN}"
            marker = uuid.uuid4().hex
            _send(postfix, rcpt, _message(rcpt, marker))  # RCPT verified: the stub says 250

            postfix.wait_log(r"status=bounced \(host .* said: 554 5\.6\.0 refused by the self-test")
            postfix.wait_log(r"sender non-delivery notification")
            (dsn_id,) = postfix.bounces()
            dsn = postfix.message(dsn_id)
            assert b"Undelivered Mail Returned to Sender" in dsn
            assert marker.encode() in dsn
            # the bounced message leaves the queue a moment after its DSN is logged: wait for that event
            wait_until(lambda: [e["queue_id"] for e in postfix.queue()] == [dsn_id], timeout=60, what="only the DSN")
            (entry,) = postfix.queue()
            assert (entry["queue_id"], entry["sender"]) == (dsn_id, "MAILER-DAEMON")  # null sender
            assert entry["recipients"][0]["address"] == SENDER
    finally:
        stub.stop()


class _StubMailboxes:
    """aiosmtpd handler: ``nobody*`` is unknown (550 at RCPT), the rest is kept."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []

    async def handle_RCPT(
        self, server: object, session: object, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.lower().startswith("nobody"):
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: object, session: object, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append((list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 OK"


class _UnixLMTPController(UnixSocketController):
    def factory(self) -> LMTP:
        return LMTP(self.handler)


def test_lmtp_over_a_unix_socket() -> None:
    """``lmtp:unix:/path``: the socket's path does not show in the 550."""
    sock_dir = Path(tempfile.mkdtemp(prefix="lmtp-stub-"))
    sock_dir.chmod(0o755)  # the lmtp client runs as the postfix user
    sock = sock_dir / "lmtp.sock"
    handler = _StubMailboxes()
    stub = _UnixLMTPController(handler, unix_socket=sock)
    stub.start()
    sock.chmod(0o666)
    try:
        with PostfixServer([DOMAIN], f"lmtp:unix:{sock}") as postfix:
            with smtplib.SMTP(postfix.host, postfix.port, timeout=30) as smtp:
                smtp.ehlo()
                assert smtp.mail(SENDER)[0] == 250
                code, text = smtp.rcpt(f"nobody@{DOMAIN}")
                assert code == 550, text
                assert str(sock).encode() not in text
                assert smtp.rcpt(f"incoming+key@{DOMAIN}")[0] == 250
                assert smtp.data(_message(f"incoming+key@{DOMAIN}", "unix"))[0] == 250
            wait_until(lambda: bool(handler.messages), timeout=30, what="delivery over the unix socket")
            ((rcpts, content),) = handler.messages
            assert rcpts == [f"incoming+key@{DOMAIN}"]
            assert b"Subject: postfix selftest unix" in content
            postfix.wait_queue_empty()
    finally:
        stub.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_start_configures_and_stop_leaves_nothing(dovecot: DovecotServer) -> None:
    server = PostfixServer([DOMAIN, "other.test"], lmtp_next_hop(dovecot.lmtp_port))
    server.start()
    pgid, tmpdir, port = server.pid, server.tmpdir, server.port
    assert pgid is not None
    try:
        assert server.postconf("relay_domains") == f"{DOMAIN}, other.test"
        assert server.postconf("message_size_limit") == str(25 * 1024 * 1024)
        assert "daemon started" in server.maillog_text()
        assert server.queue_ids() == []
    finally:
        server.stop()
    server.stop()
    assert not server.running
    assert not group_alive(pgid)
    assert not tmpdir.exists()
    with pytest.raises(OSError), smtplib.SMTP("127.0.0.1", port, timeout=1):
        pass


def test_nothing_survives_a_killed_test_process(tmp_path: Path) -> None:
    """SIGKILL the process that started Postfix: every daemon goes too."""
    script = (
        "import sys, time\n"
        "from tests.servers.postfix import PostfixServer\n"
        "server = PostfixServer(['incoming.test'], 'lmtp:inet:127.0.0.1:1').start()\n"
        "print(server.pid, server.tmpdir, flush=True)\n"
        "time.sleep(60)\n"
    )
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        pgid_text, tmpdir = child.stdout.readline().split()
        pgid = int(pgid_text)
        assert group_alive(pgid)
    finally:
        child.kill()
        child.wait()
    try:
        wait_until(lambda: not group_alive(pgid), timeout=30, what="postfix gone after its parent died")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)  # atexit did not run


def test_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError):
        PostfixServer("incoming.test", "lmtp:inet:127.0.0.1:1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PostfixServer(["a.test"], "lmtp:inet:127.0.0.1:1, evil")
    with pytest.raises(ValueError):
        PostfixServer([], "lmtp:inet:127.0.0.1:1")
