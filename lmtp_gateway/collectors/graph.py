"""Microsoft Graph collector: unread messages of a mail folder, MIME through ``$value``, marked read (or deleted)
only once the journal has them.

Unlike mail_room it refreshes the token before it expires (and once more on a 401), honours ``Retry-After`` on
429 and 503, and never has more than four requests in flight per mailbox, which is what Exchange Online's
throttling allows per app and mailbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from lmtp_gateway.collectors import Ref
from lmtp_gateway.errors import SourceError

log = logging.getLogger(__name__)

AZURE_AD_ENDPOINT = "https://login.microsoftonline.com"
GRAPH_ENDPOINT = "https://graph.microsoft.com"
CONCURRENT_REQUESTS = 4
MAX_THROTTLED = 5  # answers of 429/503 in a row before the round is given up (and retried after a backoff)
MAX_RETRY_AFTER = 120.0


@dataclass(frozen=True)
class GraphSettings:
    user: str
    tenant_id: str
    client_id: str
    client_secret: str
    mailbox: str = "inbox"
    poll_interval: int = 60
    azure_ad_endpoint: str = AZURE_AD_ENDPOINT
    graph_endpoint: str = GRAPH_ENDPOINT
    delete_after_delivery: bool = True  # GitLab's default (its docs advise false for Graph)

    @classmethod
    def from_config(cls, settings: Mapping[str, Any], where: str) -> GraphSettings:
        options = settings.get("inbox_options") or {}
        missing = [f"inbox_options.{k}" for k in ("tenant_id", "client_id", "client_secret") if not options.get(k)]
        if not settings.get("user"):
            missing.insert(0, "user")
        if missing:
            raise ValueError(f"{where}: {', '.join(missing)} missing (needed for inbox_method: microsoft_graph)")
        return cls(
            user=settings["user"],
            tenant_id=options["tenant_id"],
            client_id=options["client_id"],
            client_secret=options["client_secret"],
            mailbox=settings.get("mailbox") or "inbox",
            poll_interval=int(options.get("poll_interval") or 60),
            azure_ad_endpoint=(options.get("azure_ad_endpoint") or AZURE_AD_ENDPOINT).rstrip("/"),
            graph_endpoint=(options.get("graph_endpoint") or GRAPH_ENDPOINT).rstrip("/"),
            delete_after_delivery=bool(settings.get("delete_after_delivery", True)),
        )


class ClientCredentials:
    """An OAuth 2.0 client-credentials token from Microsoft identity platform, renewed before it expires.

    Without an `http` client of the caller's (IMAP's XOAUTH2), each renewal, hourly, opens and closes its own."""

    def __init__(self, http: httpx.AsyncClient | None, endpoint: str, tenant_id: str, client_id: str, secret: str,
                 scope: str) -> None:  # fmt: skip
        self.http = http
        self.url = f"{endpoint.rstrip('/')}/{quote(tenant_id)}/oauth2/v2.0/token"
        self.form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret,
                     "scope": scope}  # fmt: skip
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = asyncio.Lock()

    def forget(self) -> None:
        self._token = None

    async def __call__(self) -> str:
        async with self._lock:
            if self._token is None or time.monotonic() >= self._renew_at:
                await self._fetch()
            assert self._token is not None
            return self._token

    async def _fetch(self) -> None:
        try:
            if self.http is not None:
                response = await self.http.post(self.url, data=self.form)
            else:
                async with httpx.AsyncClient(timeout=30.0) as http:
                    response = await http.post(self.url, data=self.form)
        except httpx.HTTPError as error:
            raise SourceError(f"token endpoint {self.url}: {error}") from None
        if response.status_code != 200:
            detail = _error_text(response)
            raise SourceError(f"token refused by {self.url} ({response.status_code}): {detail}")
        body = response.json()
        lifetime = float(body.get("expires_in", 3600))
        self._token = body["access_token"]
        # renew five minutes early, or half-way for short-lived tokens
        self._renew_at = time.monotonic() + max(lifetime - 300, lifetime / 2)


class GraphSource:
    def __init__(self, settings: GraphSettings, *, http: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.name = f"graph:{settings.user}/{settings.mailbox}"
        self._http = http
        self._own_http = http is None
        self._token: ClientCredentials | None = None
        self._gate = asyncio.Semaphore(CONCURRENT_REQUESTS)
        base = f"{settings.graph_endpoint}/v1.0/users/{quote(settings.user)}/mailFolders/{quote(settings.mailbox)}"
        self._messages = f"{base}/messages"

    async def connect(self) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0))
        s = self.settings
        self._token = ClientCredentials(self._http, s.azure_ad_endpoint, s.tenant_id, s.client_id,
                                        s.client_secret, f"{s.graph_endpoint}/.default")  # fmt: skip
        await self._token()  # fail early on bad credentials

    async def close(self) -> None:
        if self._own_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _request(self, method: str, url: str, **options: Any) -> httpx.Response:
        """One Graph request: a fresh token, a second try after a 401, waits as told on 429/503."""
        assert self._http is not None and self._token is not None
        throttled = 0
        renewed = False
        while True:
            async with self._gate:
                headers = {"Authorization": f"Bearer {await self._token()}"}
                try:
                    response = await self._http.request(method, url, headers=headers, **options)
                except httpx.HTTPError as error:
                    raise SourceError(f"Graph {method}: {error}") from None
            if response.status_code == 401 and not renewed:
                self._token.forget()
                renewed = True
                continue
            if response.status_code in (429, 503) and throttled < MAX_THROTTLED:
                throttled += 1
                delay = _retry_after(response, throttled)
                log.warning("%s: Graph answered %d, waiting %.0fs as asked", self.name, response.status_code, delay,
                            extra={"event": "collector_throttled"})  # fmt: skip
                await asyncio.sleep(delay)
                continue
            return response

    async def pending(self, limit: int, skip: Collection[str] = ()) -> list[Ref]:
        url: str | None = self._messages
        params: dict[str, Any] | None = {"$filter": "isRead eq false", "$select": "id", "$top": min(limit, 100)}
        refs: list[Ref] = []
        while url and len(refs) < limit:
            response = await self._request("GET", url, params=params)
            _expect(response, 200, "list messages")
            body = response.json()
            found = (Ref(f"{self.settings.user}/{self.settings.mailbox}:{m['id']}", m["id"]) for m in body["value"])
            refs.extend(ref for ref in found if ref.key not in skip)
            url, params = body.get("@odata.nextLink"), None  # the link carries the query
        return refs[:limit]

    async def fetch(self, refs: Sequence[Ref]) -> dict[str, bytes]:
        async def one(ref: Ref) -> tuple[str, bytes | None]:
            response = await self._request("GET", f"{self._messages}/{quote(ref.handle)}/$value")
            if response.status_code == 404:
                return ref.handle, None  # gone meanwhile (moved or deleted by someone)
            _expect(response, 200, "fetch message")
            return ref.handle, response.content

        results = await asyncio.gather(*(one(ref) for ref in refs))
        return {handle: raw for handle, raw in results if raw is not None}

    async def settle(self, refs: Sequence[Ref]) -> None:
        async def one(ref: Ref) -> None:
            url = f"{self._messages}/{quote(ref.handle)}"
            if self.settings.delete_after_delivery:
                response = await self._request("DELETE", url)
                _expect(response, (204, 404), "delete message")
            else:
                response = await self._request("PATCH", url, json={"isRead": True})
                _expect(response, (200, 404), "mark message read")

        await asyncio.gather(*(one(ref) for ref in refs))

    async def wait(self, timeout: float) -> None:
        """Graph has no push here: the next look is `poll_interval` away, whatever the caller's timeout (which
        is IMAP's idle_timeout, 60 s by default, and would cap a longer interval the admin chose)."""
        await asyncio.sleep(self.settings.poll_interval)


def _retry_after(response: httpx.Response, attempt: int) -> float:
    try:
        return min(float(response.headers["Retry-After"]), MAX_RETRY_AFTER)
    except (KeyError, ValueError):
        return min(2.0**attempt, MAX_RETRY_AFTER)


def _expect(response: httpx.Response, ok: int | tuple[int, ...], what: str) -> None:
    if response.status_code not in (ok if isinstance(ok, tuple) else (ok,)):
        raise SourceError(f"Graph {what}: {response.status_code} {_error_text(response)}")


def _error_text(response: httpx.Response) -> str:
    """The error's code and description from a Microsoft error body, never the request (it holds secrets)."""
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase
    error = body.get("error")
    if isinstance(error, dict):
        return f"{error.get('code', '')}: {error.get('message', '')}"[:200]
    return f"{error or ''}: {body.get('error_description', '')}"[:200]
