"""The LMTP session under random input, against a real `lmtp-gateway serve`: command sequences in any order,
pipelined and cut into random pieces, with bytes that are not UTF-8, bare CRs, over-long lines and messages of
any shape. Whatever arrives, the session answers every command it reads, never with an internal error, ends
when the client says QUIT (or, after too much garbage, with aiosmtpd's goodbye), and leaves the journal whole."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import REPLY_RCPT, GatewayProcess, gateway_yaml, tmp_leftovers
from tests.lmtp_client import dot_stuff

GOOD_RCPTS = [REPLY_RCPT.encode(), b"incoming+gitlab-org-gitlab-20-Tok3n-issue@incoming.test",
              b"contact+project_slug-project_key@incoming.test"]  # fmt: skip
BAD_ADDRESSES = [b"nobody@incoming.test", b"incoming+!!!@incoming.test", b"\xff\xfe@evil.example", b"a\rb@x",
                 b"", b"<>", b"incoming+\xc3\x28@incoming.test", b"x" * 600 + b"@x"]  # fmt: skip


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Path]]:
    directory = tmp_path_factory.mktemp("fuzz")
    config = directory / "gw.yml"
    import yaml

    config.write_text(yaml.safe_dump(gateway_yaml(directory / "spool", lmtp={"listen": "127.0.0.1:0"})))
    process = GatewayProcess(config, directory / "gateway.log").start()
    try:
        yield process, directory / "spool"
    finally:
        process.kill()


header_lines = st.sampled_from(
    [b"From: a@example.org", f"To: {REPLY_RCPT}".encode(), b"Subject: \xe4\xf6\xfc", b"Auto-Submitted: auto-replied",
     b"References: <a@b> <reply-59d8df8370b7e95c5a49fbf86aeb2c93@gitlab.test>", b"X-Long: " + b"y" * 1200, b".",
     b"..", b" folded", b"", b"Content-Type: text/plain; charset=iso-8859-1", b"bare\rcr", b"\xff\xfe\x00"]
)  # fmt: skip
messages = st.lists(header_lines, max_size=12).map(lambda lines: b"\r\n".join(lines) + b"\r\n")
transactions = st.builds(
    lambda rcpts, message: b"MAIL FROM:<a@example.org>\r\n" + b"".join(b"RCPT TO:<" + r + b">\r\n" for r in rcpts)
    + b"DATA\r\n" + dot_stuff(message).removesuffix(b"\r\n"),
    st.lists(st.sampled_from(GOOD_RCPTS + BAD_ADDRESSES[:2]), min_size=1, max_size=4),
    messages,
)  # whole transactions, so that many examples reach the end of DATA
commands = st.one_of(
    st.just(b"LHLO fuzz.test"),
    transactions,
    st.builds(lambda a, p: b"MAIL FROM:<" + a + b">" + p, st.sampled_from([b"a@example.org", *BAD_ADDRESSES]),
              st.sampled_from([b"", b" SIZE=100", b" SIZE=999999999", b" BODY=8BITMIME", b" SMTPUTF8", b" BOGUS"])),
    st.builds(lambda a: b"RCPT TO:<" + a + b">", st.sampled_from(GOOD_RCPTS + BAD_ADDRESSES)),
    st.builds(lambda m: b"DATA\r\n" + dot_stuff(m).removesuffix(b"\r\n"), messages),
    st.sampled_from([b"RSET", b"NOOP", b"HELO x", b"EHLO x", b"VRFY x", b"DATA extra", b"MAIL", b"RCPT"]),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.just(b"NOOP " + b"x" * 2000),
)  # fmt: skip


def session(address: tuple[str, int], script: bytes, cuts: list[int]) -> list[bytes]:
    """Send `script` in pieces, then read every reply line until the server closes (after QUIT, or a goodbye).
    The client never half-closes first: aiosmtpd takes that for a client gone, and so would any mail server."""
    with socket.create_connection(address, timeout=60) as conn:
        position = 0
        try:
            for cut in [*sorted(set(cuts)), len(script)]:
                conn.sendall(script[position:cut])
                position = max(position, cut)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server hung up first (too many bad commands): what it said before is still to be read
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                received += chunk
    return received.split(b"\r\n")[:-1]


# Each path the closing test looks for, reached whatever the random examples do.
EVERY_PATH = [
    b"MAIL FROM:<a@example.org>\r\nRCPT TO:<" + REPLY_RCPT.encode() + b">\r\nDATA\r\nSubject: x\r\n\r\nhi",
    b"MAIL FROM:<a@example.org>\r\nRCPT TO:<nobody@incoming.test>",
    b"MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+\xc3\x28@incoming.test>",
    b"MAIL FROM:<a@example.org>\r\nRCPT TO:<" + REPLY_RCPT.encode() + b">\r\nDATA\r\nX-Long: " + b"y" * 1200,
]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(commands, min_size=1, max_size=12), st.lists(st.integers(0, 4000), max_size=6))
@example(EVERY_PATH[:1], []).via("a queued copy")
@example(EVERY_PATH[1:2], []).via("a refusal at RCPT")
@example(EVERY_PATH[2:3], []).via("an address that is not UTF-8")
@example(EVERY_PATH[3:], [100]).via("a line too long")
def test_any_input_gets_answers_and_never_an_internal_error(
    serve: tuple[GatewayProcess, Path], script_commands: list[bytes], cuts: list[int]
) -> None:
    process, _ = serve
    # the end marker: a DATA that random bytes opened is closed before QUIT (else it is one more bad command)
    script = b"LHLO fuzz.test\r\n" + b"".join(c + b"\r\n" for c in script_commands) + b".\r\nQUIT\r\n"
    lines = session(("127.0.0.1", process.port), script, cuts)
    assert lines and lines[0].startswith(b"220 ")
    codes = [line[:3] for line in lines]
    assert all(code.isdigit() for code in codes), lines
    assert b"451" not in codes and b"421" not in codes, lines  # no internal error, whatever came in
    assert not any(b"Error: (" in line for line in lines), lines  # aiosmtpd's text for an exception
    assert codes[-1] in (b"221", b"502"), lines  # QUIT answered, or too many unknown commands
    ANSWERS.update(line[:9] for line in lines)


ANSWERS: set[bytes] = set()  # every kind of answer the examples got, to show the fuzzing reached them


def test_after_the_fuzzing_the_journal_is_whole_and_the_gateway_answers(serve: tuple[GatewayProcess, Path]) -> None:
    process, spool = serve
    # the examples reached every path: queued copies, refusals at RCPT, bad addresses, long lines
    assert {b"250 2.0.0", b"550 5.1.1", b"553 5.1.3", b"354 End d", b"500 5.5.2"} <= ANSWERS
    lines = session(("127.0.0.1", process.port), b"LHLO after.test\r\nQUIT\r\n", [])
    assert lines[0].startswith(b"220 ") and lines[-1].startswith(b"221")
    assert not (spool / "quarantine").exists() or not any((spool / "quarantine").iterdir())
    assert not tmp_leftovers(spool)
