"""A stand-in for Microsoft identity platform and Microsoft Graph's mail API, which tests cannot reach.

It implements the documented contract the collector relies on:

- ``POST /<tenant>/oauth2/v2.0/token`` (client credentials): form ``grant_type=client_credentials``,
  ``client_id``, ``client_secret``, ``scope=<graph endpoint>/.default``; answers ``access_token``, ``expires_in``,
  ``token_type: Bearer``, or 401 ``invalid_client`` with an ``AADSTS`` description;
- ``GET /v1.0/users/<user>/mailFolders/<folder>/messages`` with ``$filter=isRead eq false``, ``$select``,
  ``$top``: a page of ``value`` and an ``@odata.nextLink`` (with ``$skip``) while more remain;
- ``GET …/messages/<id>/$value``: the MIME message; ``PATCH …/messages/<id>`` with ``{"isRead": true}``;
  ``DELETE …/messages/<id>`` (204); 404 ``ErrorItemNotFound`` for an unknown id;
- 401 ``InvalidAuthenticationToken`` for a missing, unknown or expired token; 429 (or 503) with ``Retry-After``
  when told to throttle.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.http_stub import LocalHttpStub


@dataclass
class StoredMessage:
    id: str
    raw: bytes
    is_read: bool = False


@dataclass
class GraphStub(LocalHttpStub):
    tenant: str = "tenant-1"
    client_id: str = "client-1"
    client_secret: str = "s3cret-value"
    user: str = "gitlab@example.onmicrosoft.com"
    folder: str = "inbox"
    expires_in: int = 3600
    max_page: int = 10  # Graph pages long lists; a small page makes the collector follow nextLink
    latency: float = 0.0  # seconds each $value takes, to see concurrency
    messages: dict[str, StoredMessage] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    token_requests: int = 0
    unauthorized: int = 0  # 401 answers to Graph requests
    throttle: list[int] = field(default_factory=list)  # Retry-After seconds for the next requests
    throttle_status: int = 429  # or 503, which Graph also sends with Retry-After
    requests: list[tuple[float, str, str]] = field(default_factory=list)  # (time, method, path)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def graph_endpoint(self) -> str:
        return f"{self.url}/graph"

    @property
    def login_endpoint(self) -> str:
        return f"{self.url}/login"

    def add(self, raw: bytes) -> str:
        with self.lock:
            message_id = "AAMk" + secrets.token_urlsafe(12)
            self.messages[message_id] = StoredMessage(message_id, raw)
            return message_id

    def unread(self) -> list[StoredMessage]:
        with self.lock:
            return [m for m in self.messages.values() if not m.is_read]

    def expire_tokens(self) -> None:
        with self.lock:
            self.tokens = {token: 0.0 for token in self.tokens}

    def start(self) -> GraphStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _answer(
                self, status: int, body: bytes | dict[str, Any] | None, headers: dict[str, str] | None = None
            ) -> None:
                payload = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                if isinstance(body, dict):
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length) if length else b""
                with stub.lock:
                    stub.requests.append((time.monotonic(), method, self.path))
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    self._answer(*stub.handle(method, self.path, self.headers.get("Authorization"), body))
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PATCH(self) -> None:
                self._handle("PATCH")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self._serve(Handler)
        return self

    # --- the contract ---

    def handle(self, method: str, target: str, authorization: str | None, body: bytes) -> tuple[Any, ...]:
        url = urlsplit(target)
        path = unquote(url.path)
        if method == "POST" and path == f"/login/{self.tenant}/oauth2/v2.0/token":
            return self._token(parse_qs(body.decode()))
        if method == "POST" and path == "/introspect":  # RFC 7662, for Dovecot's oauth2 passdb (IMAP XOAUTH2)
            token = parse_qs(body.decode()).get("token", [""])[0]
            with self.lock:
                active = self.tokens.get(token, 0.0) > time.monotonic()
            return 200, {"active": active, **({"username": self.user} if active else {})}
        if not path.startswith("/graph/v1.0/"):
            return 404, {"error": {"code": "ResourceNotFound", "message": "Resource not found"}}
        token = (authorization or "").removeprefix("Bearer ")
        with self.lock:
            expiry = self.tokens.get(token)
            throttled = self.throttle.pop(0) if self.throttle else None
        if expiry is None or expiry <= time.monotonic():
            with self.lock:
                self.unauthorized += 1
            return 401, {"error": {"code": "InvalidAuthenticationToken", "message": "Access token has expired."}}
        if throttled is not None and self.throttle_status == 503:
            error = {"error": {"code": "ServiceUnavailable", "message": "The service is temporarily unavailable."}}
            return 503, error, {"Retry-After": str(throttled)}
        if throttled is not None:
            message = "Application is over its MailboxConcurrency limit."
            error = {"error": {"code": "ApplicationThrottled", "message": message}}
            return 429, error, {"Retry-After": str(throttled)}
        base = f"/graph/v1.0/users/{self.user}/mailFolders/{self.folder}/messages"
        if path == base and method == "GET":
            return self._list(parse_qs(url.query))
        if not path.startswith(base + "/"):
            return 404, {"error": {"code": "ErrorItemNotFound", "message": "The mailbox or folder was not found."}}
        message_id, _, rest = path[len(base) + 1 :].partition("/")
        with self.lock:
            message = self.messages.get(message_id)
        if message is None:
            return 404, {"error": {"code": "ErrorItemNotFound", "message": "The specified object was not found."}}
        if method == "GET" and rest == "$value":
            time.sleep(self.latency)  # simulated network latency (see max_in_flight)
            return 200, message.raw, {"Content-Type": "text/plain"}
        if method == "PATCH" and not rest:
            changes = json.loads(body)
            with self.lock:
                message.is_read = bool(changes.get("isRead", message.is_read))
            return 200, {"id": message.id, "isRead": message.is_read}
        if method == "DELETE" and not rest:
            with self.lock:
                self.messages.pop(message_id, None)
            return 204, None
        return 405, {"error": {"code": "ErrorInvalidRequest", "message": "Unsupported."}}

    def _token(self, form: dict[str, list[str]]) -> tuple[Any, ...]:
        def one(name: str) -> str:
            return form.get(name, [""])[0]

        with self.lock:
            self.token_requests += 1
        if one("grant_type") != "client_credentials" or one("scope") != f"{self.graph_endpoint}/.default":
            return 400, {"error": "invalid_request", "error_description": "AADSTS900144: bad grant_type or scope"}
        if one("client_id") != self.client_id or one("client_secret") != self.client_secret:
            description = "AADSTS7000215: Invalid client secret provided."
            return 401, {"error": "invalid_client", "error_description": description}
        token = secrets.token_urlsafe(24)
        with self.lock:
            self.tokens[token] = time.monotonic() + self.expires_in
        return 200, {"token_type": "Bearer", "expires_in": self.expires_in, "access_token": token}

    def _list(self, query: dict[str, list[str]]) -> tuple[Any, ...]:
        if query.get("$filter", [""])[0] != "isRead eq false":
            return 400, {"error": {"code": "BadRequest", "message": "expected $filter=isRead eq false"}}
        top = min(int(query.get("$top", ["10"])[0]), self.max_page)
        skip = int(query.get("$skip", ["0"])[0])
        unread = self.unread()
        page = unread[skip : skip + top]
        answer: dict[str, Any] = {"value": [{"id": m.id} for m in page]}
        if skip + top < len(unread):
            base = f"{self.graph_endpoint}/v1.0/users/{self.user}/mailFolders/{self.folder}/messages"
            query = f"%24filter=isRead+eq+false&%24select=id&%24top={top}&%24skip={skip + top}"
            answer["@odata.nextLink"] = f"{base}?{query}"
        return 200, answer
