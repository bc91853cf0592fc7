"""Sinks: the ways a journal entry reaches GitLab, behind one small interface.

``deliver(entry, raw)`` answers ``Delivered``, ``Transient`` (keep it, try again later) or ``Permanent`` (GitLab
refused it for good: dead letter). A sink never raises for a delivery problem; the dispatcher still treats an
unexpected exception as transient, so a bug cannot lose mail.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import jwt
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from lmtp_gateway.config import Config, MailboxConfig, RedisConfig
from lmtp_gateway.errors import ConfigError
from lmtp_gateway.journal import Entry
from lmtp_gateway.logs import redact_urls
from lmtp_gateway.rules import INCOMING_EMAIL, SERVICE_DESK_EMAIL
from lmtp_gateway.secrets import check_secret_file


@dataclass(frozen=True)
class Delivered:
    detail: str = ""


@dataclass(frozen=True)
class Transient:
    reason: str
    timed_out: bool = False  # no answer in time: the far side may have acted on it (it is sent again)


@dataclass(frozen=True)
class Permanent:
    reason: str


Outcome = Delivered | Transient | Permanent


class Sink(Protocol):
    name: str

    async def deliver(self, entry: Entry, raw: bytes, *, force: bool = False) -> Outcome:
        """`force`: deliver even if this entry was delivered before (replay after GitLab lost it)."""
        ...

    async def probe(self) -> str | None:
        """Could a delivery go through now? None if so, else a one-line reason (for /readyz and `check`)."""
        ...


# --- Sidekiq ---

WORKERS = {INCOMING_EMAIL: "EmailReceiverWorker", SERVICE_DESK_EMAIL: "ServiceDeskEmailReceiverWorker"}
WORKER_RETRY = 3  # what both GitLab workers declare in sidekiq_options; Sidekiq's own client would send it
SENTINEL_REFRESH_SECONDS = 30.0  # how often a Sidekiq sink asks Sentinel which replicas are up

# Atomic "push once": the dedupe key and the job go in together or not at all, so neither a Postfix retry nor
# a crash between the push and the journal's bookkeeping can make a second job. A push found done refreshes the
# key all the same: a write later than the first push, so that the WAIT after it covers the first push also on
# a Redis that counts from the connection's last write rather than its last command. Nothing is written while
# the master has fewer connected replicas than ARGV[6]: a master Sentinel has just replaced has none, and a job
# left there could be lost with it, or run there and again once the retry pushes it to the new master.
# The answer: {1 pushed, 0 found done, -1 not written; the master's connected replicas}.
# ARGV: ttl, queue, job, jid, force ("1" pushes again even when the key exists: an admin's replay), replicas.
_PUSH_ONCE = """
local replication = redis.call('INFO', 'replication')
local replicas = tonumber(string.match(replication, 'connected_slaves:(%d+)')) or 0
if replicas < tonumber(ARGV[6]) then return {-1, replicas} end
local fresh = redis.call('SET', KEYS[1], ARGV[4], 'NX', 'EX', tonumber(ARGV[1]))
local pushed = 0
if fresh or ARGV[5] == '1' then
  if not fresh then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1])) end
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('LPUSH', KEYS[3], ARGV[3])
  pushed = 1
else
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
end
return {pushed, replicas}
"""


def sidekiq_job(worker: str, queue: str, raw: bytes, jid: str, style: str, now: float) -> dict[str, object]:
    """The job exactly as GitLab's workers expect it (docs/gitlab-rules.md §8)."""
    stamp: float | int = now if style == "sidekiq7" else int(now * 1000)
    return {
        "class": worker,
        "args": [raw.decode("utf-8", "replace")],
        "queue": queue,
        "jid": jid,
        "retry": WORKER_RETRY,
        "created_at": stamp,
        "enqueued_at": stamp,
    }


def redis_client(settings: RedisConfig) -> aioredis.Redis:
    """A client for GitLab's queues Redis: a plain URL, or Sentinel with the master name as the URL's host."""
    # A push may wait for the replicas' acknowledgement (WAIT) before Redis answers it
    socket_timeout = 5.0 + settings.replica_wait_timeout
    options = {"socket_timeout": socket_timeout, "socket_connect_timeout": 3.0, "health_check_interval": 30}
    if not settings.sentinels:
        return aioredis.Redis.from_url(settings.url, **options)
    url = urlsplit(settings.url)
    sentinel = Sentinel(
        list(settings.sentinels),
        sentinel_kwargs={"password": settings.sentinel_password} if settings.sentinel_password else {},
        password=url.password,
        username=url.username,
        db=int(url.path.strip("/") or 0),
        ssl=url.scheme == "rediss",
        **options,
    )
    return sentinel.master_for(url.hostname or "gitlab-redis")


def redis_problem(error: BaseException) -> str:
    """ "redis: ConnectionError: Connection refused": the system's reason, where redis-py's own text repeats the
    address twice and hides it."""
    cause = error.__cause__ or error.__context__
    if isinstance(error, redis.exceptions.ConnectionError) and isinstance(cause, OSError) and cause.errno:
        return f"redis: ConnectionError: {os.strerror(cause.errno)}"
    return f"redis: {type(error).__name__}: {error}"


PUSHES_PER_ROUND_TRIP = 64  # jobs of up to 25 MB each are bounded by the dispatcher's bytes in flight


@dataclass
class _Push:
    """One job on its way: the script's keys and arguments, the replicas to WAIT for, the caller's future."""

    keys: list[str]
    args: list[Any]
    wait: int
    answer: asyncio.Future[tuple[Any, int | None]]


class SidekiqSink:
    """Pushes each entry once as a job (see _PUSH_ONCE). Redis replicates asynchronously: a job only the master
    holds is lost if a replica is promoted before it arrives, and Sentinel, after promoting one, lets the old
    master take writes for seconds before demoting it and wiping them. So, as `redis.replicas_to_wait` says,
    a job is written only on a master with that many replicas, and counts as delivered only once they
    acknowledge it (Redis WAIT, sent in the same round trip as the push); until then it is a temporary failure,
    and the retry finds the job (or pushes it to the new master) and waits again."""

    name = "sidekiq"

    def __init__(self, mailbox: str, settings: RedisConfig, client: aioredis.Redis, ttl: int) -> None:
        self.worker = WORKERS[mailbox]
        self.settings = settings
        self.client = client
        self.ttl = max(ttl, 3600)
        prefix = f"{settings.namespace}:" if settings.namespace else ""
        self.queues_key = f"{prefix}queues"
        self.queue_key = f"{prefix}queue:{settings.queue}"
        self.dedupe_prefix = f"{prefix}lmtp-gateway:delivered:"
        self.probe_key = f"{prefix}lmtp-gateway:probe:{socket.gethostname()}"
        # Pushes that wait to be sent, and the task sending them: one pipeline at a time, carrying every push
        # that arrived meanwhile (as the journal's group commit does): one round trip for many jobs under load.
        self._waiting: list[_Push] = []
        self._sending: asyncio.Task[None] | None = None
        self.wait_ms = max(1, round(settings.replica_wait_timeout * 1000))
        # The master's connected replicas at the last push (None: not asked yet). It only decides whether the
        # WAIT goes along with the next push; what counts is what the master says with each push.
        self.replicas_seen: int | None = None
        # The master's replicas Sentinel sees up (None: not known yet), and when it was last asked
        self.sentinel_replicas: int | None = None
        self._sentinel_asked = -SENTINEL_REFRESH_SECONDS

    @property
    def replicas_required(self) -> int:
        """Replicas the master must have before a job is written at all: the number asked for; with "auto" and
        Sentinel, every replica Sentinel sees up (it may promote any of them; one until it has said); none
        without Sentinel."""
        wanted = self.settings.replicas_to_wait
        if isinstance(wanted, int):
            return wanted
        if not self.settings.sentinels:
            return 0
        return 1 if self.sentinel_replicas is None else self.sentinel_replicas

    def replicas_needed(self, connected: int) -> int:
        """How many replicas must acknowledge a job, the master having `connected` replicas."""
        return max(self.replicas_required, 1 if self.settings.replicas_to_wait == "auto" and connected else 0)

    async def _wait_along(self) -> int:
        """How many replicas to WAIT for in the push's round trip: none when the master had too few at the last
        push (the push is then answered at once); before the first push, the master is asked."""
        if self.settings.replicas_to_wait == 0:
            return 0
        seen = self.replicas_seen
        if seen is None:
            try:
                seen = int((await self.client.info("replication")).get("connected_slaves", 0))
            except (TimeoutError, redis.exceptions.RedisError, OSError, ValueError):
                seen = 0  # the push itself will tell
        needed = self.replicas_needed(seen)
        return needed if 0 < needed <= seen else 0

    async def _ask_sentinel(self, *, soon: bool = False) -> None:
        """Learn how many of the master's replicas Sentinel sees up (not down, not disconnected), every
        SENTINEL_REFRESH_SECONDS, or after a second when `soon`. Unanswered, the last answer stands."""
        pool = self.client.connection_pool
        if self.settings.replicas_to_wait != "auto" or not isinstance(pool, SentinelConnectionPool):
            return
        if time.monotonic() - self._sentinel_asked < (1.0 if soon else SENTINEL_REFRESH_SECONDS):
            return
        self._sentinel_asked = time.monotonic()
        for sentinel in pool.sentinel_manager.sentinels:
            with contextlib.suppress(TimeoutError, redis.exceptions.RedisError, OSError, KeyError, TypeError):
                replicas = await sentinel.sentinel_slaves(pool.service_name)
                down = ("is_sdown", "is_odown", "is_disconnected")
                self.sentinel_replicas = sum(not any(replica[flag] for flag in down) for replica in replicas)
                return

    async def deliver(self, entry: Entry, raw: bytes, *, force: bool = False) -> Outcome:
        await self._ask_sentinel()
        job = sidekiq_job(self.worker, self.settings.queue, raw, entry.id, self.settings.timestamp_style, time.time())
        keys = [self.dedupe_prefix + entry.fingerprint, self.queues_key, self.queue_key]
        job_text = json.dumps(job, ensure_ascii=False)
        args = [self.ttl, self.settings.queue, job_text, entry.id, int(force), self.replicas_required]
        wait = await self._wait_along()
        try:
            answer, acknowledged = await self._send(_Push(keys, args, wait, asyncio.get_running_loop().create_future()))
        except (TimeoutError, redis.exceptions.RedisError, OSError) as error:
            return Transient(redis_problem(error))
        if isinstance(answer, Exception):
            return Transient(redis_problem(answer))
        pushed, connected = (int(value) for value in answer)
        self.replicas_seen = connected
        needed = self.replicas_needed(connected)
        if pushed < 0:
            if self.settings.sentinels:
                await self._follow_sentinel()
            return Transient(
                f"redis: not written: the master has {connected} connected replicas and {needed} must hold each job"
            )
        detail = "pushed" if pushed else "already in Redis (dedupe)"
        if not needed:
            return Delivered(detail)
        if wait < needed:
            return Transient("redis: job written; the master has replicas again, the retry waits for them")
        acknowledged = acknowledged or 0
        if acknowledged < needed:
            return Transient(
                f"redis: job written, but {acknowledged} of the {needed} replicas needed acknowledged it within "
                f"{self.settings.replica_wait_timeout:g}s"
            )
        return Delivered(f"{detail}, on {acknowledged} replica{'s' if acknowledged > 1 else ''}")

    async def _send(self, push: _Push) -> tuple[Any, int | None]:
        """The script's answer for `push` (or the error Redis gave for it) and, when a WAIT went along, how many
        replicas acknowledged the pipeline's writes."""
        self._waiting.append(push)
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send_waiting(), name="sidekiq-push")
        return await push.answer

    async def _send_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:PUSHES_PER_ROUND_TRIP], self._waiting[PUSHES_PER_ROUND_TRIP:]
            wait = max(push.wait for push in batch)
            try:
                # One connection, one round trip: WAIT counts the replicas that have this connection's writes.
                # Retried on a new connection, the pipeline sends all again: the WAIT follows the writes.
                async with self.client.pipeline(transaction=False) as pipe:
                    for push in batch:
                        pipe.eval(_PUSH_ONCE, len(push.keys), *push.keys, *push.args)
                    if wait:
                        pipe.execute_command("WAIT", wait, self.wait_ms)
                    answers = await pipe.execute(raise_on_error=False)
            except (TimeoutError, redis.exceptions.RedisError, OSError) as error:
                for push in batch:
                    if not push.answer.done():
                        push.answer.set_exception(error)
                continue
            acknowledged = answers[-1] if wait and not isinstance(answers[-1], Exception) else None
            for push, answer in zip(batch, answers, strict=False):
                if not push.answer.done():
                    push.answer.set_result((answer, None if acknowledged is None else int(acknowledged)))

    async def _follow_sentinel(self) -> None:
        """A master without its replicas may be one Sentinel has just replaced: ask Sentinel where the master is,
        so that the client drops its connections to the old one and the retry goes to the new one, and which
        replicas it sees up (a crashed one no longer counts)."""
        pool = self.client.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            with contextlib.suppress(TimeoutError, redis.exceptions.RedisError, OSError):
                await pool.get_master_address()
            await self._ask_sentinel(soon=True)

    async def probe(self, *, queue: bool = True) -> str | None:
        """Reachable and writable, as a push needs it, without touching a job: a short-lived SET beside the dedupe
        keys (fails on a read-only replica, when Redis is out of memory or an ACL forbids it) and an LTRIM that
        keeps the whole queue (fails if the queue key holds something other than a list, or is not writable).
        `queue=False` leaves the queue alone: collectors arbitrating there write keys only. With the queue, the
        master must also have the replicas `redis.replicas_to_wait` asks for: without them no push counts."""
        if queue:
            await self._ask_sentinel()
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(self.probe_key, "1", ex=60)
                if queue:
                    pipe.ltrim(self.queue_key, 0, -1)
                    pipe.info("replication")
                answers = await pipe.execute()
        except (TimeoutError, redis.exceptions.RedisError, OSError) as error:
            return redis_problem(error)
        if queue:
            connected = int(answers[-1].get("connected_slaves", 0))
            needed = self.replicas_needed(connected)
            if connected < needed:
                return (
                    f"redis: the master has {connected} connected replicas and {needed} must hold each job "
                    "(redis.replicas_to_wait): deliveries wait"
                )
        return None


# --- webhook (GitLab's internal mail_room API) ---


def read_webhook_key(path: Path) -> bytes:
    """GitLab's .gitlab_mailroom_secret: base64 of exactly 32 bytes."""
    check_secret_file(path)
    try:
        key = base64.b64decode(path.read_bytes().strip(), validate=True)
    except (OSError, binascii.Error, ValueError):
        raise ConfigError(f"{path}: not a base64 secret (GitLab's .gitlab_mailroom_secret)") from None
    if len(key) != 32:
        raise ConfigError(f"{path}: the secret decodes to {len(key)} bytes; GitLab needs exactly 32")
    return key


def webhook_token(key: bytes, now: float | None = None) -> str:
    claims = {
        "iss": "gitlab-mailroom",
        "iat": int(now if now is not None else time.time()),
        "nonce": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm="HS256")


class WebhookSink:
    name = "webhook"

    def __init__(self, mailbox: str, gitlab_url: str, key: bytes, client: httpx.AsyncClient) -> None:
        self.url = f"{gitlab_url.rstrip('/')}/api/v4/internal/mail_room/{mailbox}"
        self.key = key
        self.client = client

    async def post(self, body: bytes) -> httpx.Response:
        """POST `body` to GitLab's mail_room API with a fresh token (raises httpx.HTTPError)."""
        headers = {"Content-Type": "text/plain", "Gitlab-Mailroom-Api-Request": webhook_token(self.key)}
        return await self.client.post(self.url, content=body, headers=headers)

    async def probe(self) -> str | None:
        """GitLab answers HTTP at the API's address. Only reachability: every POST GitLab accepts queues a job, so a
        probe repeated every few seconds must not POST (`lmtp-gateway check` proves the token, once). A GET gets
        GitLab's 404/405; 502-504 are what a proxy answers while GitLab itself is down."""
        try:
            response = await self.client.get(self.url, timeout=5.0)
        except httpx.HTTPError as error:
            return redact_urls(f"webhook: cannot reach {self.url}: {type(error).__name__}: {error}")
        if response.status_code in (502, 503, 504):
            return redact_urls(
                f"webhook: HTTP {response.status_code} from {self.url}: GitLab is not answering behind its proxy"
            )
        return None

    async def deliver(self, entry: Entry, raw: bytes, *, force: bool = False) -> Outcome:
        try:
            response = await self.post(raw)
        except httpx.TimeoutException as error:
            return Transient(redact_urls(f"webhook: no answer from GitLab in time ({type(error).__name__})"), True)
        except httpx.HTTPError as error:
            return Transient(redact_urls(f"webhook: {type(error).__name__}: {error}"))
        if response.status_code == 200:
            return Delivered("200")
        if response.status_code == 400:
            return Permanent(
                f"webhook: GitLab refused the message (400: too large; it sent the rejection): {_snippet(response)}"
            )
        if response.status_code == 401:
            return Transient("webhook: 401 from GitLab: secret_file does not match GitLab's or the mailbox is disabled")
        return Transient(f"webhook: HTTP {response.status_code} from GitLab: {_snippet(response)}")


def _snippet(response: httpx.Response) -> str:
    return response.text[:200].replace("\n", " ")


# --- Maildir (the embedded default: no GitLab needed) ---


class MaildirSink:
    name = "maildir"

    def __init__(self, root: Path) -> None:
        self.root = root

    def _make_dirs(self) -> None:
        for sub in ("tmp", "new", "cur"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o750)

    def _probe_sync(self) -> None:
        self._make_dirs()
        probe = self.root / "tmp" / f"probe.{uuid.uuid4().hex}"
        probe.write_bytes(b"probe\n")
        probe.unlink()

    async def probe(self) -> str | None:
        try:
            await asyncio.to_thread(self._probe_sync)
        except OSError as error:
            return f"maildir {self.root}: {error.strerror or error}"
        return None

    def _deliver_sync(self, entry: Entry, raw: bytes, force: bool) -> str:
        self._make_dirs()
        name = f"{int(entry.received_at)}.{entry.id}.{socket.gethostname()}"
        if (self.root / "new" / name).exists() or any((self.root / "cur").glob(f"{name}*")):
            if not force:
                return "already in the Maildir"
            name = f"{int(time.time())}.{entry.id}_{uuid.uuid4().hex[:6]}.{socket.gethostname()}"
        tmp = self.root / "tmp" / name
        with open(tmp, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.root / "new" / name)
        return f"new/{name}"

    async def deliver(self, entry: Entry, raw: bytes, *, force: bool = False) -> Outcome:
        try:
            return Delivered(await asyncio.to_thread(self._deliver_sync, entry, raw, force))
        except OSError as error:
            return Transient(f"maildir: {error.strerror or error}")


@dataclass
class Sinks:
    """One sink per mailbox, sharing one Redis client and one HTTP client between them."""

    by_mailbox: dict[str, Sink]
    redis: aioredis.Redis | None = None
    http: httpx.AsyncClient | None = None

    def __getitem__(self, mailbox: str) -> Sink:
        return self.by_mailbox[mailbox]

    async def close(self) -> None:
        for client in (self.redis, self.http):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()


def build_sinks(config: Config) -> Sinks:
    methods = {mailbox.delivery_method for mailbox in config.mailboxes.values()}
    sinks = Sinks({})
    if config.uses_redis:
        sinks.redis = redis_client(config.redis)
    if "webhook" in methods:
        sinks.http = httpx.AsyncClient(timeout=httpx.Timeout(config.webhook_timeout, connect=5.0))
    for name, mailbox in config.mailboxes.items():
        sinks.by_mailbox[name] = _build_sink(config, mailbox, sinks)
    return sinks


def _build_sink(config: Config, mailbox: MailboxConfig, shared: Sinks) -> Sink:
    if mailbox.delivery_method == "sidekiq":
        assert shared.redis is not None
        return SidekiqSink(mailbox.name, config.redis, shared.redis, config.spool.retention)
    if mailbox.delivery_method == "webhook":
        assert config.gitlab_url and mailbox.secret_file and shared.http  # checked when the configuration was loaded
        return WebhookSink(mailbox.name, config.gitlab_url, read_webhook_key(mailbox.secret_file), shared.http)
    root = mailbox.settings.get("maildir_path")
    return MaildirSink(Path(root) if root else config.spool.path / "maildir" / mailbox.name)
