"""IMAP collector: IDLE for push, ``BODY.PEEK[]`` so the mailbox is unchanged until the journal has the message.

Built on aioimaplib, with what it lacks added here: STARTTLS (it knows the command but cannot upgrade the
connection) and a reader for ``UID FETCH`` answers (it hands back raw lines and literals).

What is waiting: undeleted messages that are unseen, or whose UID is above the last one this collector settled
(so a message somebody read in webmail before it was collected is still collected). UIDVALIDITY and that last
UID are kept in a small state file beside the journal; when UIDVALIDITY changes the UIDs mean nothing any more,
so the collector falls back to "unseen" and the journal recognises the messages it already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import ssl
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aioimaplib import aioimaplib

from lmtp_gateway.collectors import Ref
from lmtp_gateway.collectors.graph import ClientCredentials
from lmtp_gateway.errors import SourceError

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 30.0
POLL_SECONDS = 10.0  # servers without IDLE are asked this often
DEFAULT_MAILBOX = "inbox"  # GitLab's default


@dataclass(frozen=True)
class ImapSettings:
    """A mailbox's IMAP keys, with GitLab's defaults."""

    host: str
    port: int
    user: str
    password: str | None
    mailbox: str = DEFAULT_MAILBOX
    ssl: bool = False
    start_tls: bool = False
    verify: bool = True
    ca_file: str | None = None
    idle_timeout: int = 60
    delete_after_delivery: bool = True  # GitLab's default
    expunge_deleted: bool = False

    @classmethod
    def from_config(cls, settings: Mapping[str, Any], where: str) -> ImapSettings:
        missing = [key for key in ("host", "user") if not settings.get(key)]
        if missing:
            raise ValueError(f"{where}: {' and '.join(missing)} missing (needed to collect over IMAP)")
        use_ssl = bool(settings.get("ssl", False))
        return cls(
            host=settings["host"],
            port=int(settings.get("port") or (993 if use_ssl else 143)),
            user=settings["user"],
            password=settings.get("password"),
            mailbox=settings.get("mailbox") or DEFAULT_MAILBOX,
            ssl=use_ssl,
            start_tls=bool(settings.get("start_tls", False)),
            verify=bool(settings.get("ssl_verify", True)),
            ca_file=settings.get("ssl_ca_file"),
            idle_timeout=int(settings.get("idle_timeout") or 60),
            delete_after_delivery=bool(settings.get("delete_after_delivery", True)),
            expunge_deleted=bool(settings.get("expunge_deleted", False)),
        )

    @property
    def identity(self) -> str:
        return f"{self.user}@{self.host.lower()}:{self.port}/{self.mailbox}"

    def tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


class _ClientProtocol(aioimaplib.IMAP4ClientProtocol):
    def _handle_responses(
        self,
        data: bytes,
        line_handler: Callable[[bytes, Any], Any],
        current_cmd: aioimaplib.Command | None = None,
    ) -> None:
        """aioimaplib's reader, as a loop: it recursed once per line received, so an answer of a thousand lines
        in one read (sizes of a large backlog, a long EXPUNGE) raised RecursionError."""
        while True:
            if not data:
                if self.pending_sync_command is not None:
                    self.pending_sync_command.flush()
                if current_cmd is not None and current_cmd.wait_data():
                    raise aioimaplib.IncompleteRead(current_cmd)
                return
            if current_cmd is not None and current_cmd.wait_literal_data():
                data = current_cmd.append_literal_data(data)
                if current_cmd.wait_literal_data():
                    raise aioimaplib.IncompleteRead(current_cmd)
            line, separator, tail = data.partition(b"\r\n")
            if not separator:
                raise aioimaplib.IncompleteRead(current_cmd, data)
            command = line_handler(line, current_cmd)
            literal = aioimaplib.literal_data_re.match(line)
            if literal:
                if command is None:
                    command = aioimaplib.Command("NIL", "unused")
                command.begin_literal_data(int(literal.group("size")))
                data, current_cmd = tail, command
            elif command is not None and command.wait_data():
                data, current_cmd = tail, command
            else:
                data, current_cmd = tail, None

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        response = await self.execute(aioimaplib.Command("STARTTLS", self.new_tag(), loop=self.loop))
        if response.result != "OK":
            raise SourceError(f"STARTTLS refused: {_text(response)}")
        assert self.loop is not None
        transport = await self.loop.start_tls(self.transport, self, context, server_hostname=server_hostname)  # type: ignore[arg-type]
        if transport is None:
            raise SourceError("STARTTLS: the TLS handshake did not complete")
        self.transport = transport
        await self.capability()  # RFC 3501: what was learnt before TLS must be forgotten


class _Client(aioimaplib.IMAP4):
    protocol: _ClientProtocol

    def create_client(
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop | None,
        conn_lost_cb: Callable[[Exception | None], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        running = loop or asyncio.get_running_loop()
        self.protocol = _ClientProtocol(running, conn_lost_cb)
        self._client_task = running.create_task(
            running.create_connection(lambda: self.protocol, host, port, ssl=ssl_context)
        )


_FETCH_LINE = re.compile(rb"\d+ FETCH \(")
_UID = re.compile(rb"UID (\d+)")
_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")
_CODE = re.compile(rb"\[(UIDVALIDITY|UIDNEXT) (\d+)\]")


def _text(response: Any) -> str:
    lines = [line for line in response.lines if isinstance(line, bytes)]
    return lines[-1].decode(errors="replace") if lines else response.result


def parse_fetch(lines: Sequence[bytes | bytearray]) -> dict[int, bytes]:
    """The literal of each message in a ``UID FETCH (UID BODY.PEEK[])`` answer, by UID; the UID may come
    before or after the literal."""
    found: dict[int, bytes] = {}
    uid: int | None = None
    literal: bytes | None = None
    for line in lines:
        if isinstance(line, bytearray):
            literal = bytes(line)
        elif _FETCH_LINE.match(line):
            uid, literal = None, None
        if isinstance(line, bytes) and (match := _UID.search(line)):
            uid = int(match.group(1))
        if uid is not None and literal is not None:
            found[uid] = literal
            uid, literal = None, None
    return found


@dataclass
class UidState:
    """What survives a restart: the mailbox's UIDVALIDITY and the highest UID settled."""

    path: Path
    uidvalidity: int | None = None
    last_uid: int = 0

    @classmethod
    def load(cls, path: Path) -> UidState:
        try:
            data = json.loads(path.read_text())
            return cls(path, int(data["uidvalidity"]), int(data["last_uid"]))
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("collector state %s unreadable (%s): starting from unread messages", path, error)
            return cls(path)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".new")
        with open(temporary, "w") as handle:
            json.dump({"uidvalidity": self.uidvalidity, "last_uid": self.last_uid}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


class ImapSource:
    def __init__(
        self,
        settings: ImapSettings,
        state_path: Path,
        *,
        token: ClientCredentials | None = None,
    ) -> None:
        self.settings = settings
        self.name = f"imap:{settings.identity}"
        self.state = UidState.load(state_path)
        self._token = token
        self._client: _Client | None = None
        self._lost = asyncio.Event()
        self._uidvalidity = 0
        self._unsettled: set[int] = set()  # waiting above last_uid at the last `pending`, not settled since
        self._settled: set[int] = set()  # settled above last_uid in this session

    # --- connection ---

    async def connect(self) -> None:
        settings = self.settings
        self._lost = asyncio.Event()
        self._settled = set()
        context = settings.tls_context() if settings.ssl or settings.start_tls else None
        self._client = client = _Client(
            settings.host,
            settings.port,
            timeout=COMMAND_TIMEOUT,
            conn_lost_cb=lambda _error: self._lost.set(),
            ssl_context=context if settings.ssl else None,
        )
        try:
            await client.wait_hello_from_server()
        except ssl.SSLCertVerificationError as error:
            raise _untrusted(settings.host, error) from None
        except (OSError, TimeoutError) as error:
            raise SourceError(f"cannot connect to {settings.host}:{settings.port}: {error or 'timed out'}") from None
        if settings.start_tls:
            if not client.has_capability("STARTTLS"):
                raise SourceError(f"{settings.host} does not offer STARTTLS (start_tls: true)")
            assert context is not None
            try:
                await asyncio.wait_for(client.protocol.starttls(context, settings.host), COMMAND_TIMEOUT)
            except ssl.SSLCertVerificationError as error:
                raise _untrusted(settings.host, error) from None
        elif not settings.ssl and not _is_loopback(settings.host):
            log.warning(
                "%s: neither ssl nor start_tls is set: the password crosses the network in clear text",
                self.name,
                extra={"event": "collector_insecure"},
            )
        await self._authenticate(client)
        response = await client.select(settings.mailbox)
        if response.result != "OK":
            raise SourceError(f"cannot select mailbox {settings.mailbox!r}: {_text(response)}")
        self._after_select(response.lines)

    async def _authenticate(self, client: _Client) -> None:
        if self._token is not None:
            response = await client.xoauth2(self.settings.user, await self._token())  # type: ignore[arg-type]
            method = "XOAUTH2"
        else:
            if self.settings.password is None:
                raise SourceError("password missing (needed for IMAP LOGIN)")
            response = await client.login(self.settings.user, self.settings.password)
            method = "LOGIN"
        if response.result != "OK":
            if self._token is not None:
                self._token.forget()  # revoked early, perhaps: the next attempt asks for a new one
            raise SourceError(f"{method} refused for {self.settings.user}: {_text(response)}")
        await asyncio.wait_for(client.protocol.capability(), COMMAND_TIMEOUT)  # may change with login (RFC 3501)

    def _after_select(self, lines: Sequence[bytes]) -> None:
        codes = {m.group(1): int(m.group(2)) for line in lines if isinstance(line, bytes) for m in _CODE.finditer(line)}
        self._uidvalidity = codes.get(b"UIDVALIDITY", 0)
        uidnext = codes.get(b"UIDNEXT", 1)
        if self.state.uidvalidity != self._uidvalidity:
            if self.state.uidvalidity is not None:
                log.warning(
                    "%s: UIDVALIDITY changed from %s to %s: collecting every unread message; the journal "
                    "recognises those it already has",
                    self.name,
                    self.state.uidvalidity,
                    self._uidvalidity,
                    extra={"event": "collector_uidvalidity"},
                )
            self.state.uidvalidity = self._uidvalidity
            self.state.last_uid = uidnext - 1  # what was read before is not ours to collect
            self.state.save()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if not self._lost.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.logout(), 5)
        transport = client.protocol.transport
        if transport is not None:
            transport.close()

    # --- the work ---

    def _connected(self) -> _Client:
        if self._client is None or self._lost.is_set():
            raise SourceError("connection lost")
        return self._client

    async def pending(self, limit: int, skip: Collection[str] = ()) -> list[Ref]:
        client = self._connected()
        after = self.state.last_uid + 1
        # Two searches: in "UID n:*" the * always matches the newest message, even below n, so a combined
        # search could not tell an unseen message from that one.
        unseen = await self._search(client, "UNDELETED", "UNSEEN")
        newer = {uid for uid in await self._search(client, "UNDELETED", f"UID {after}:*") if uid >= after}
        candidates = sorted(unseen | newer)
        # Left ones count too (too large for now, or held by another collector): last_uid must wait for them.
        self._unsettled = {uid for uid in candidates if uid >= after and uid not in self._settled}
        uids = [uid for uid in candidates if self._key(uid) not in skip][:limit]
        if not uids:
            return []
        sizes = await client.uid("fetch", _uid_set(uids), "(UID RFC822.SIZE)")
        by_uid: dict[int, int] = {}
        for line in sizes.lines:
            if isinstance(line, bytes) and (uid := _UID.search(line)) and (size := _SIZE.search(line)):
                by_uid[int(uid.group(1))] = int(size.group(1))
        return [Ref(self._key(uid), str(uid), by_uid[uid]) for uid in uids if uid in by_uid]  # else expunged meanwhile

    def _key(self, uid: int) -> str:
        return f"{self.settings.identity}:{self._uidvalidity}:{uid}"

    @staticmethod
    async def _search(client: _Client, *criteria: str) -> set[int]:
        response = await client.uid_search(*criteria, charset=None)
        if response.result != "OK":
            raise SourceError(f"UID SEARCH failed: {_text(response)}")
        # aioimaplib strips "* SEARCH"; the last line is the tagged completion text
        return {int(word) for line in response.lines[:-1] for word in line.split() if word.isdigit()}

    async def fetch(self, refs: Sequence[Ref]) -> dict[str, bytes]:
        if not refs:
            return {}
        client = self._connected()
        response = await client.uid("fetch", _uid_set(int(r.handle) for r in refs), "(UID BODY.PEEK[])")
        if response.result != "OK":
            raise SourceError(f"UID FETCH failed: {_text(response)}")
        return {str(uid): raw for uid, raw in parse_fetch(response.lines).items()}

    async def settle(self, refs: Sequence[Ref]) -> None:
        if not refs:
            return
        client = self._connected()
        uids = [int(r.handle) for r in refs]
        flags = r"(\Seen \Deleted)" if self.settings.delete_after_delivery else r"(\Seen)"
        response = await client.uid("store", _uid_set(uids), "+FLAGS.SILENT", flags)
        if response.result != "OK":
            raise SourceError(f"UID STORE failed: {_text(response)}")
        if self.settings.delete_after_delivery and self.settings.expunge_deleted:
            if client.has_capability("UIDPLUS"):
                response = await client.uid("expunge", _uid_set(uids))
            else:
                response = await client.expunge()
            if response.result != "OK":
                log.warning("%s: EXPUNGE failed: %s", self.name, _text(response))
        # last_uid means "everything up to here is settled": it must not pass a listed message that was left
        # (another collector held it, its commit failed), or a read copy of it would never be listed again.
        self._settled.update(uids)
        self._unsettled.difference_update(uids)
        settled_to = min([max(uids), *(uid - 1 for uid in self._unsettled)])
        if settled_to > self.state.last_uid:
            self.state.last_uid = settled_to
            self._settled = {uid for uid in self._settled if uid > settled_to}
            await asyncio.to_thread(self.state.save)

    async def wait(self, timeout: float) -> None:
        client = self._connected()
        if not client.has_capability("IDLE"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), min(timeout, POLL_SECONDS))
            await client.noop()
            return
        queue = client.protocol.idle_queue
        while not queue.empty():  # pushes left over from an earlier IDLE; the caller has searched since
            queue.get_nowait()
        waiting: list[asyncio.Future[Any]] = []
        try:
            idle = await client.idle_start(timeout=min(timeout, self.settings.idle_timeout))
            waiting += [asyncio.ensure_future(client.wait_server_push(timeout + COMMAND_TIMEOUT))]
            waiting += [asyncio.ensure_future(self._lost.wait())]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # stopping: end the IDLE, or the LOGOUT that follows waits behind it
            if not self._lost.is_set() and client.has_pending_idle():
                client.idle_done()
            raise
        finally:
            for task in waiting:
                task.cancel()
        if self._lost.is_set():
            raise SourceError("connection lost while idling")
        client.idle_done()
        await asyncio.wait_for(idle, COMMAND_TIMEOUT)


def _untrusted(host: str, error: ssl.SSLCertVerificationError) -> SourceError:
    return SourceError(
        f"{host}: certificate not trusted ({error.verify_message}); give ssl_ca_file, "
        "or ssl_verify: false for a test server"
    )


def _uid_set(uids: Any) -> str:
    return ",".join(str(uid) for uid in uids)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
