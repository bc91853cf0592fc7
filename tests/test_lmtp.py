"""LMTP ingress against a running gateway: replies per recipient in every path, pipelining, limits."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import stat
import threading
from pathlib import Path

import pytest

from lmtp_gateway.journal import State
from tests.conftest import (
    REPLY_KEY,
    REPLY_RCPT,
    StartGateway,
    eventually,
    make_config,
    message,
    numbered_message,
    tmp_leftovers,
)
from tests.lmtp_client import LmtpClient, dot_stuff

ISSUE_RCPT = "incoming+group-project-42-Tok3n-issue@incoming.test"
DESK_RCPT = "contact+project_slug-project_key@incoming.test"


def entries(spool: Path, state: State) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((spool / state.value).glob("*.json"))]


def nothing_committed(spool: Path) -> bool:
    return not any(any((spool / state.value).iterdir()) for state in State)


def maildir_messages(spool: Path, mailbox: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((spool / "maildir" / mailbox / "new").glob("*"))]


async def test_lhlo_advertises_what_lmtp_clients_need(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    client = await LmtpClient.connect(gateway.address)
    assert client.greeting.startswith("220 ")
    await client.lhlo()
    assert {"PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", f"SIZE {25 * 1024 * 1024}"} <= set(
        client.capabilities
    )
    assert (await client.command("HELO x")).startswith("500 5.5.2")
    assert (await client.command("NOOP")).startswith("250 2.0.0")
    await client.quit()


async def test_mixed_recipients_get_one_reply_each_in_rcpt_order(start_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = await start_gateway()
    client = await gateway.client()
    rcpts = [REPLY_RCPT, "nobody@incoming.test", ISSUE_RCPT, "incoming+!!!bad!!!@incoming.test", DESK_RCPT]
    done = await client.send("alice@example.org", rcpts, message("From: alice@example.org", "Subject: hi"))
    assert done.mail.startswith("250 2.1.0")
    assert [r[:9] for r in done.rcpt_replies] == ["250 2.1.5", "550 5.1.1", "250 2.1.5", "550 5.1.1", "250 2.1.5"]
    assert "fits no GitLab handler" in done.rcpt_replies[3]
    assert len(done.results) == 3
    for reply, rcpt in zip(done.results, [REPLY_RCPT, ISSUE_RCPT, DESK_RCPT], strict=True):
        assert reply.startswith(f"250 2.0.0 <{rcpt}> ") and reply.endswith(" queued")
    await client.quit()
    spool = tmp_path / "spool"
    await eventually(lambda: len(entries(spool, State.DELIVERED)) == 3, what="three deliveries")
    by_rcpt = {e["rcpt"]: e for e in entries(spool, State.DELIVERED)}
    assert by_rcpt[ISSUE_RCPT]["handler"] == "create_issue"
    assert by_rcpt[DESK_RCPT]["mailbox"] == "service_desk_email"
    copies = maildir_messages(spool, "incoming_email")
    assert sorted(c.split(b"\r\n")[1] for c in copies) == sorted(
        f"Delivered-To: {r}".encode() for r in (REPLY_RCPT, ISSUE_RCPT)
    )
    assert all(c.startswith(b"Return-Path: <alice@example.org>\r\n") for c in copies)


async def test_dedicated_address_needs_a_key_in_the_headers(start_gateway: StartGateway, tmp_path: Path) -> None:
    config = make_config(tmp_path / "spool", incoming_email={"address": "reply@incoming.test"})
    gateway = await start_gateway(config)
    client = await gateway.client()
    without = await client.send("a@example.org", ["reply@incoming.test", DESK_RCPT], message("Subject: hi"))
    assert without.results[0].startswith("550 5.1.1 <reply@incoming.test> We couldn't figure out what the email")
    # GitLab's Service Desk needs an incoming_email address with %{key}: refused at RCPT, before any DATA
    assert without.rcpt_replies[1].startswith("550 5.1.1") and "Service Desk needs" in without.rcpt_replies[1]
    assert len(without.results) == 1
    with_key = await client.send(
        "a@example.org", ["reply@incoming.test"], message(f"References: <reply-{REPLY_KEY}@gitlab.test> <x@y.z>")
    )
    assert with_key.results[0].startswith("250 2.0.0")
    await client.quit()


async def test_auto_reply_is_accepted_and_dropped(start_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = await start_gateway()
    client = await gateway.client()
    done = await client.send("", [REPLY_RCPT], message("Auto-Submitted: auto-replied", "Subject: away"))
    assert done.results[0].startswith("250 2.0.0") and "discarded" in done.results[0]
    # then a human's mail: once it is delivered, the auto-reply had every chance to be delivered too
    await client.send("a@example.org", [REPLY_RCPT], message("Subject: human", "Message-ID: <h@x>"))
    await client.quit()
    await eventually(lambda: gateway.gateway.dispatcher.stats.delivered == 1, what="the human's mail delivered")
    await gateway.gateway.dispatcher.flush()
    dropped = entries(tmp_path / "spool", State.DROPPED)
    assert len(dropped) == 1 and dropped[0]["mail_from"] == "" and dropped[0]["drop"] == "auto_generated"
    (delivered,) = maildir_messages(tmp_path / "spool", "incoming_email")
    assert b"Subject: human" in delivered


async def test_a_retry_of_a_committed_message_makes_no_second_entry(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = await start_gateway()
    raw = numbered_message(1)
    first = await (await gateway.client()).send("a@example.org", [REPLY_RCPT], raw)
    second = await (await gateway.client()).send("a@example.org", [REPLY_RCPT], raw)
    entry_id = first.results[0].split()[3]
    assert second.results[0] == f"250 2.0.0 <{REPLY_RCPT}> {entry_id} already queued"
    await eventually(lambda: entries(tmp_path / "spool", State.DELIVERED), what="delivery")
    assert len(maildir_messages(tmp_path / "spool", "incoming_email")) == 1


async def test_pipelined_sessions_with_connection_reuse(start_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = await start_gateway()

    async def session(number: int) -> list[str]:
        client = await gateway.client()
        replies = []
        for index in range(10):
            done = await client.send("a@example.org", [REPLY_RCPT, DESK_RCPT], numbered_message(number * 100 + index))
            replies += done.results
            assert (await client.command("RSET")).startswith("250 2.0.0")
        await client.quit()
        return replies

    results = await asyncio.gather(*(session(n) for n in range(8)))
    assert all(r.startswith("250 2.0.0") for rs in results for r in rs)
    assert sum(len(r) for r in results) == 160
    await eventually(lambda: len(entries(tmp_path / "spool", State.DELIVERED)) == 160, what="160 deliveries")


async def test_data_without_recipients_and_bad_sequences(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    client = await gateway.client()
    assert (await client.command("DATA")).startswith("503 5.5.1")
    assert (await client.command("RCPT TO:<x@y>")).startswith("503 5.5.1")
    done = await client.send("a@example.org", ["nobody@incoming.test"], b"x\r\n")
    assert done.data and done.data.startswith("503 5.5.1") and not done.results
    await client.quit()


async def test_message_over_the_size_limit(start_gateway: StartGateway, tmp_path: Path) -> None:
    config = make_config(tmp_path / "spool", lmtp={"max_message_size": "1M"})
    gateway = await start_gateway(config)
    client = await gateway.client()
    assert (await client.command("MAIL FROM:<a@b> SIZE=2000000")).startswith("552 5.3.4")
    await client.command("RSET")
    big = message("Subject: big", body=("x" * 76 + "\n") * 30_000)  # 2.3 MB
    done = await client.send("a@example.org", [REPLY_RCPT, ISSUE_RCPT], big)
    assert [r[:9] for r in done.results] == ["552 5.3.4", "552 5.3.4"]
    assert REPLY_RCPT in done.results[0] and ISSUE_RCPT in done.results[1]
    after = await client.send("a@example.org", [REPLY_RCPT], numbered_message(7))  # the session goes on
    assert after.results[0].startswith("250 2.0.0")
    await client.quit()
    await eventually(lambda: gateway.gateway.dispatcher.stats.delivered == 1, what="the one message delivered")
    assert len(entries(tmp_path / "spool", State.DELIVERED)) == 1 and not entries(tmp_path / "spool", State.PENDING)
    assert not tmp_leftovers(tmp_path / "spool")


async def test_over_long_line(start_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = await start_gateway()
    client = await gateway.client()
    done = await client.send("a@example.org", [REPLY_RCPT, DESK_RCPT], message("Subject: x", body="y" * 5000 + "\n"))
    assert [r[:9] for r in done.results] == ["500 5.5.2", "500 5.5.2"]
    assert (await client.command("NOOP")).startswith("250")
    await client.quit()
    assert not entries(tmp_path / "spool", State.PENDING) and not entries(tmp_path / "spool", State.DELIVERED)


async def test_internal_error_gives_451_per_recipient(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = await start_gateway()

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(gateway.gateway.intake, "accept", broken)
    client = await gateway.client()
    done = await client.send("a@example.org", [REPLY_RCPT, DESK_RCPT], numbered_message(1))
    assert [r[:9] for r in done.results] == ["451 4.3.0", "451 4.3.0"]
    assert "injected" not in " ".join(done.results)  # no internals leak to the client
    await client.quit()


async def test_client_gone_mid_data_leaves_nothing(start_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = await start_gateway()
    client = await gateway.client()
    client.writer.write(f"MAIL FROM:<a@b>\r\nRCPT TO:<{REPLY_RCPT}>\r\nDATA\r\n".encode())
    for _ in range(3):
        await client.reply()
    client.writer.write(b"Subject: half\r\n\r\n" + b"x" * 100_000)
    await client.writer.drain()
    await eventually(lambda: any(s.busy for s in gateway.gateway.lmtp.sessions), what="DATA in progress")
    client.abort()
    await eventually(lambda: not gateway.gateway.lmtp.sessions, what="session closed")
    spool = tmp_path / "spool"
    assert not tmp_leftovers(spool)
    assert nothing_committed(spool)


async def test_unix_socket_with_mode_and_group_beside_a_tcp_listener(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """As Postfix needs it: its group may connect (Postfix's LMTP client has no other group), and several
    listeners serve at once."""
    socket_path = tmp_path / "run" / "lmtp.sock"
    group = grp.getgrnam("mail")  # a group every Debian system has; tests run as root, so chown may give it
    lmtp = {"listen": [f"unix:{socket_path}", "127.0.0.1:0"], "socket_mode": "0660", "socket_group": group.gr_name}
    gateway = await start_gateway(make_config(tmp_path / "spool", lmtp=lmtp))
    unix_address, tcp_address = gateway.gateway.lmtp.addresses
    assert unix_address == f"unix:{socket_path}" and tcp_address.startswith("127.0.0.1:")
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o660 and socket_path.stat().st_gid == group.gr_gid
    for number, address in enumerate((unix_address, tcp_address)):
        client = await LmtpClient.connect(address)
        await client.lhlo()
        done = await client.send("a@example.org", [REPLY_RCPT], numbered_message(number))
        assert done.results[0].startswith("250 2.0.0"), address
        await client.quit()
    await gateway.stop()
    assert not socket_path.exists()


async def test_recovery_delivers_what_was_pending(start_gateway: StartGateway, tmp_path: Path) -> None:
    config = make_config(tmp_path / "spool", incoming_email={"maildir_path": str(tmp_path / "readonly")})
    (tmp_path / "readonly").mkdir(mode=0o500)
    (tmp_path / "readonly" / "new").write_text("not a directory")  # the sink cannot deliver: stays pending
    gateway = await start_gateway(config)
    client = await gateway.client()
    done = await client.send("a@example.org", [REPLY_RCPT], numbered_message(5))
    assert done.results[0].startswith("250")
    await client.quit()
    await eventually(lambda: gateway.gateway.dispatcher.stats.transient >= 1, what="a failed attempt")
    await gateway.stop()
    assert len(entries(tmp_path / "spool", State.DEFERRED)) == 1  # waiting for its retry
    (tmp_path / "readonly" / "new").unlink()
    restarted = await start_gateway(config)
    await eventually(lambda: restarted.gateway.dispatcher.stats.delivered == 1, what="delivery after restart")
    assert len(entries(tmp_path / "spool", State.DELIVERED)) == 1
    assert not entries(tmp_path / "spool", State.PENDING) and not entries(tmp_path / "spool", State.DEFERRED)


async def test_full_disk_answers_452_and_acknowledges_nothing(start_gateway: StartGateway, small_disk: Path) -> None:
    spool = small_disk / "spool"
    gateway = await start_gateway(make_config(spool))
    client = await gateway.client()
    filler = small_disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as handle:
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
    small = await client.send("a@example.org", [REPLY_RCPT, DESK_RCPT], message("Subject: x", body="y\n" * 200_000))
    assert [r[:9] for r in small.results] == ["452 4.3.1", "452 4.3.1"]  # kept in memory, refused at commit
    done = await client.send("a@example.org", [REPLY_RCPT, DESK_RCPT], message("Subject: x", body="y\n" * 750_000))
    assert [r[:9] for r in done.results] == ["452 4.3.1", "452 4.3.1"]
    assert "disk full" in done.results[0]
    assert nothing_committed(spool)
    assert not tmp_leftovers(spool)
    filler.unlink()  # space again: the same session now succeeds
    again = await client.send("a@example.org", [REPLY_RCPT], message("Subject: x", body="y\n" * 750_000))
    assert again.results[0].startswith("250 2.0.0")
    await client.quit()


async def test_a_large_message_goes_through_a_file_to_every_recipient(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = await start_gateway()
    client = await gateway.client()
    big = message("Subject: big", body="".join(f"line {n:07d}\n" for n in range(300_000)))  # 4 MB: spilled
    done = await client.send("a@example.org", [REPLY_RCPT, ISSUE_RCPT], big)
    assert [r[:9] for r in done.results] == ["250 2.0.0", "250 2.0.0"]
    await client.quit()
    spool = tmp_path / "spool"
    await eventually(lambda: len(maildir_messages(spool, "incoming_email")) == 2, what="both copies")
    wire_body = big.replace(b"\n", b"\r\n")
    for copy in maildir_messages(spool, "incoming_email"):
        assert copy.endswith(wire_body)
    assert not tmp_leftovers(spool)


async def raw_command(client: LmtpClient, line: bytes) -> str:
    client.writer.write(line + b"\r\n")
    await client.writer.drain()
    return await client.reply()


async def test_envelope_bytes_that_are_no_text_are_refused_for_good(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """An address that is not UTF-8, or holds a control character, gets a permanent answer of its own; the other
    recipients of the transaction are taken as usual (never a 4xx that Postfix would retry for days)."""
    gateway = await start_gateway()
    client = await gateway.client()
    assert (await raw_command(client, b"MAIL FROM:<\xff\xfe@evil.example>")).startswith("553 5.1.7")
    assert (await raw_command(client, b"MAIL FROM:<a\rb@evil.example>")).startswith("553 5.1.7")
    assert (await raw_command(client, b"MAIL FROM:<alice@example.org>")).startswith("250")
    assert (await raw_command(client, b"RCPT TO:<incoming+\xff\xfe@incoming.test>")).startswith("553 5.1.3")
    assert (await raw_command(client, f"RCPT TO:<{REPLY_RCPT}>".encode())).startswith("250")
    assert (await raw_command(client, b"DATA")).startswith("354")
    client.writer.write(dot_stuff(numbered_message(1)))
    assert (await client.reply()).startswith(f"250 2.0.0 <{REPLY_RCPT}>")
    await client.quit()
    await eventually(lambda: gateway.gateway.dispatcher.stats.delivered == 1, what="the one message delivered")
    (entry,) = entries(tmp_path / "spool", State.DELIVERED)
    assert entry["mail_from"] == "alice@example.org"


async def test_recipients_past_the_cap_are_sent_later(start_gateway: StartGateway, tmp_path: Path) -> None:
    config = make_config(tmp_path / "spool", lmtp={"listen": "127.0.0.1:0", "max_recipients": 2})
    gateway = await start_gateway(config)
    client = await gateway.client()
    rcpts = [f"incoming+gitlab-org/project{n}@incoming.test" for n in range(4)]
    done = await client.send("a@example.org", rcpts, numbered_message(1))
    assert [r[:9] for r in done.rcpt_replies] == ["250 2.1.5", "250 2.1.5", "452 4.5.3", "452 4.5.3"]
    assert len(done.results) == 2 and all(r.startswith("250 2.0.0") for r in done.results)
    await client.quit()


async def test_a_transaction_puts_at_most_max_transaction_bytes_into_gitlab(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """message size × copies is bounded per transaction: past it, 452 4.5.3 (at RCPT when SIZE= says so, after
    DATA otherwise) and Postfix delivers those recipients in a later transaction."""
    config = make_config(tmp_path / "spool", lmtp={"listen": "127.0.0.1:0", "max_transaction_bytes": "25K"})
    gateway = await start_gateway(config)
    client = await gateway.client()
    big = message("Subject: big", body=("x" * 79 + "\n") * 125)
    rcpts = [f"incoming+gitlab-org/project{n}@incoming.test" for n in range(4)]
    declared = await client.send("a@example.org", rcpts, big, params=f" SIZE={len(big)}")
    assert [r[:9] for r in declared.rcpt_replies] == ["250 2.1.5", "250 2.1.5", "452 4.5.3", "452 4.5.3"]
    assert [r[:3] for r in declared.results] == ["250", "250"]
    undeclared = await client.send("b@example.org", rcpts, big)
    assert [r[:9] for r in undeclared.results] == ["250 2.0.0", "250 2.0.0", "452 4.5.3", "452 4.5.3"]
    later = await client.send("b@example.org", rcpts[2:], big)  # what Postfix does next: the rest alone
    assert [r[:9] for r in later.results] == ["250 2.0.0", "250 2.0.0"]
    await client.quit()
    spool = tmp_path / "spool"
    # the second transaction repeats the first one's copies (the same message for the same recipients): four in all
    await eventually(lambda: len(entries(spool, State.DELIVERED)) == 4, what="four copies delivered")


async def test_a_large_header_is_read_off_the_event_loop(start_gateway: StartGateway, tmp_path: Path) -> None:
    """GitLab's rules are linear, but a header of hundreds of kilobytes still takes a while: it is read in a worker
    thread, and every other session is served meanwhile. Here the worker is held until another whole transaction
    has been answered."""
    gateway = await start_gateway()
    intake = gateway.gateway.intake
    read, holding, release = intake.verdicts, threading.Event(), threading.Event()

    def held(*args: object) -> object:
        if threading.current_thread() is not threading.main_thread():  # only a large header comes here
            holding.set()
            assert release.wait(60), "never released"
        return read(*args)  # type: ignore[arg-type]

    intake.verdicts = held  # type: ignore[method-assign]
    large = message(*(f"X-Filler-{n}: {'a-1' * 30}" for n in range(1000)), f"To: {REPLY_RCPT}")
    assert len(large) > 64 * 1024
    first, second = await gateway.client(), await gateway.client()
    pending = asyncio.create_task(first.send("a@example.org", [REPLY_RCPT], large))
    await eventually(holding.is_set, what="the large header being read in a worker thread")
    small = await second.send("a@example.org", [REPLY_RCPT], numbered_message(1))  # served meanwhile
    assert small.results[0].startswith("250 2.0.0") and not pending.done()
    release.set()
    assert (await pending).results[0].startswith("250 2.0.0")
    await first.quit()
    await second.quit()
