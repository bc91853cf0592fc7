"""A stand-in for GitLab's internal mail_room API (lib/api/internal/mail_room.rb), which tests cannot reach.

It implements the documented contract faithfully: POST /api/v4/internal/mail_room/<mailbox_type> with the raw
message as the body and an HS256 JWT in ``Gitlab-Mailroom-Api-Request`` (issuer ``gitlab-mailroom``, ``iat``
mandatory and at most 5 minutes old); 401 for a bad token or a disabled mailbox, 400 when the message is larger
than GitLab's limit, 200 ``{"success":true}`` when the job was enqueued. Given a Redis (`queue_redis`), it
enqueues the job as GitLab's API does (``worker.perform_async(body)``), so a real Sidekiq can run it; GitLab first
converts a body that is not UTF-8 (``Gitlab::EncodingHelper.encode_utf8``), which the stub leaves out: it
refuses such a body with 500, since the gateway must never post one.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt

from tests.http_stub import LocalHttpStub

MAILBOX_TYPES = ("incoming_email", "service_desk_email")
WORKERS = {"incoming_email": "EmailReceiverWorker", "service_desk_email": "ServiceDeskEmailReceiverWorker"}


@dataclass
class Received:
    mailbox: str
    body: bytes
    claims: dict[str, object]
    content_type: str


@dataclass
class GitLabStub(LocalHttpStub):
    key: bytes
    max_size: int = 25 * 1024 * 1024
    enabled: tuple[str, ...] = MAILBOX_TYPES
    received: list[Received] = field(default_factory=list)
    scripted: list[int] = field(default_factory=list)  # statuses to answer first (500, 502…), then the contract
    slow: list[float] = field(default_factory=list)  # for the first messages: take them, then answer this late
    queue_redis: object | None = None  # a tests.servers.redis.RedisServer to enqueue the workers' jobs into
    server: ThreadingHTTPServer | None = None
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> GitLabStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, answer = stub.handle(self.path, self.headers.get("Gitlab-Mailroom-Api-Request"), body,
                                             self.headers.get("Content-Type", ""))  # fmt: skip
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._serve(Handler)
        return self

    def handle(self, path: str, token: str | None, body: bytes, content_type: str) -> tuple[int, dict[str, object]]:
        prefix = "/api/v4/internal/mail_room/"
        mailbox = path.removeprefix(prefix)
        if not path.startswith(prefix) or mailbox not in MAILBOX_TYPES:
            return 404, {"message": "404 Not Found"}
        try:
            claims = jwt.decode(token or "", self.key, algorithms=["HS256"], issuer="gitlab-mailroom",
                                options={"require": ["iat", "iss"]})  # fmt: skip
        except jwt.PyJWTError:
            return 401, {"message": "401 Unauthorized"}
        if int(claims["iat"]) < time.time() - 300 or mailbox not in self.enabled:
            return 401, {"message": "401 Unauthorized"}
        if self.scripted:
            return self.scripted.pop(0), {"message": "scripted failure"}
        if len(body) > self.max_size:
            return 400, {"success": False, "message": "Email is too large"}
        if self.queue_redis is not None:
            try:
                self.enqueue(WORKERS[mailbox], body.decode("utf-8"))
            except UnicodeDecodeError:
                return 500, {"message": "the body is not UTF-8"}
        with self.arrived:
            self.received.append(Received(mailbox, body, claims, content_type))
            self.arrived.notify_all()
            late = self.slow.pop(0) if self.slow else 0.0
        time.sleep(late)  # a GitLab busier than the client waits: the job is queued all the same
        return 200, {"success": True}

    def enqueue(self, worker: str, message: str) -> None:
        """A Sidekiq job as Sidekiq's client writes it (what ``perform_async`` does inside GitLab)."""
        now = time.time()
        job = {"class": worker, "args": [message], "queue": "default", "jid": uuid.uuid4().hex[:24], "retry": 3,
               "created_at": now, "enqueued_at": now}  # fmt: skip
        self.queue_redis.command("SADD", "queues", "default")  # type: ignore[attr-defined]
        self.queue_redis.command("LPUSH", "queue:default", json.dumps(job))  # type: ignore[attr-defined]
