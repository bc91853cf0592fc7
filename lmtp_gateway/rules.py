"""GitLab's incoming-mail routing rules, as pure functions.

Given the raw bytes of a message (and, over LMTP, the envelope recipient) decide exactly what GitLab would:
which mailbox, which key, which handler, or that the mail is auto-generated (dropped silently) or cannot be
routed (rejected). The reference is ../shared/GITLAB_RULES.md; section numbers below point into it.

Nothing here does I/O, and nothing here raises on any input: every regex is linear and every header value is a
plain string by the time it gets here (see ``headers.parse_headers``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Literal

from lmtp_gateway.headers import Headers, parse_headers

INCOMING_EMAIL = "incoming_email"
SERVICE_DESK_EMAIL = "service_desk_email"
MAILBOX_TYPES = (INCOMING_EMAIL, SERVICE_DESK_EMAIL)

KEY_PLACEHOLDER = "%{key}"

# GitLab's own rejection texts (§5), verbatim.
REASON_NO_KEY = (
    "We couldn't figure out what the email is for. Please create your issue or comment through the web interface."
)
REASON_BLANK = (
    "It appears that the email is blank. Make sure your reply is at the top of the email, we can't process "
    "inline replies."
)

# §4 handler formats. re.ASCII because Ruby's \d and \s are ASCII-only.
_B36 = "[0-9a-z]"
_FULL_REPLY_KEY = rf"(?:[a-f0-9]{{32}}|{_B36}{{1,4}}-{_B36}{{25}}(?:-{_B36}{{1,13}})?)"
_BASE = r"(?P<slug>.+)-(?P<project_id>\d+)"


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.ASCII)


_CREATE_NOTE = _rx(_FULL_REPLY_KEY)
_CREATE_ISSUE = _rx(rf"{_BASE}-(?P<token>.+)-issue")
_CREATE_ISSUE_LEGACY = _rx(r"(?P<path>[^+]*)\+(?P<token>.*)")
_CREATE_NOTE_ON_ISSUABLE = _rx(rf"{_BASE}-(?P<token>.+)-issue-(?P<iid>\d+)")
_UNSUBSCRIBE = _rx(rf"{_FULL_REPLY_KEY}(?:-unsubscribe|\+unsubscribe)")
_CREATE_MERGE_REQUEST = _rx(rf"{_BASE}-(?P<token>.+)-merge-request")
_CREATE_MERGE_REQUEST_LEGACY = _rx(r"(?P<path>[^+]*)\+merge-request\+(?P<token>.*)")
_SERVICE_DESK = _rx(rf"{_BASE}-issue-")
_SERVICE_DESK_LEGACY = _rx(r"[^+]*")

HANDLER_DESCRIPTIONS = {
    "create_note": "reply to a notification",
    "create_issue": "new issue by email",
    "create_note_on_issuable": "comment on an issue by email",
    "unsubscribe": "unsubscribe from notifications",
    "create_merge_request": "new merge request by email",
    "service_desk": "Service Desk",
}


def _is_create_issue(key: str) -> bool:
    if "/" not in key and _CREATE_ISSUE.fullmatch(key):
        return True
    legacy = _CREATE_ISSUE_LEGACY.fullmatch(key)
    return bool(legacy) and "+" not in legacy["token"] and "+unsubscribe" not in key


def _is_create_merge_request(key: str) -> bool:
    if "/" not in key and _CREATE_MERGE_REQUEST.fullmatch(key):
        return True
    return bool(_CREATE_MERGE_REQUEST_LEGACY.match(key))  # a prefix match in GitLab, not end-anchored


def _is_service_desk(key: str) -> bool:
    if "/" not in key and _SERVICE_DESK.fullmatch(key):
        return True
    return "/" in key and bool(_SERVICE_DESK_LEGACY.fullmatch(key))


_INCOMING_HANDLERS = (
    ("create_note", lambda key: bool(_CREATE_NOTE.fullmatch(key))),
    ("create_issue", _is_create_issue),
    ("create_note_on_issuable", lambda key: bool(_CREATE_NOTE_ON_ISSUABLE.fullmatch(key))),
    ("unsubscribe", lambda key: bool(_UNSUBSCRIBE.fullmatch(key))),
    ("create_merge_request", _is_create_merge_request),
    ("service_desk", _is_service_desk),
)


def classify_key(key: str, mailbox: str = INCOMING_EMAIL) -> str | None:
    """The GitLab handler that would take `key` arriving in `mailbox`, or None (UnknownIncomingEmail)."""
    if mailbox == SERVICE_DESK_EMAIL:
        return "service_desk"  # GitLab's Service Desk receiver takes any key (§4)
    for handler, matches in _INCOMING_HANDLERS:
        if matches(key):
            return handler
    return None


class TemplateError(ValueError):
    """An address template GitLab could not use."""


@dataclass(frozen=True, slots=True)
class AddressTemplate:
    """A mailbox's ``address``, e.g. ``incoming+%{key}@incoming.example.com`` (§1)."""

    text: str
    pattern: re.Pattern[str] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> AddressTemplate:
        at = text.rfind("@")
        if at <= 0 or at == len(text) - 1:
            raise TemplateError(f"{text!r} is not an email address (expected local@domain)")
        position = text.find(KEY_PLACEHOLDER)
        if position > at:
            raise TemplateError(f"{KEY_PLACEHOLDER} must be in the local part (before the @) of {text!r}")
        if position < 0:
            body = re.escape(text)
        else:  # only the first %{key} counts; the rest is literal
            prefix, suffix = text.split(KEY_PLACEHOLDER, 1)
            body = f"{re.escape(prefix)}(.+){re.escape(suffix)}"
        return cls(text, re.compile(f"<?{body}>?", re.DOTALL))

    @property
    def has_key(self) -> bool:
        return KEY_PLACEHOLDER in self.text

    @property
    def domain(self) -> str:
        return self.text.rsplit("@", 1)[1]

    def match(self, candidate: str) -> re.Match[str] | None:
        """Whole-string, case-sensitive match, as GitLab does."""
        return self.pattern.fullmatch(candidate)

    def key_from(self, candidate: str) -> str | None:
        found = self.match(candidate) if self.has_key else None
        return found.group(1) if found else None

    def address_for(self, key: str) -> str:
        return self.text.replace(KEY_PLACEHOLDER, key)


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """What the rules need to know about a GitLab instance: its host and its mailboxes, in GitLab's order."""

    gitlab_host: str
    mailboxes: tuple[tuple[str, AddressTemplate], ...]

    @classmethod
    def build(cls, gitlab_host: str, addresses: dict[str, str]) -> RoutingTable:
        return cls(
            gitlab_host,
            tuple((name, AddressTemplate.parse(addresses[name])) for name in MAILBOX_TYPES if name in addresses),
        )

    def restricted_to(self, mailbox: str | None) -> RoutingTable:
        if mailbox is None:
            return self
        return RoutingTable(self.gitlab_host, tuple(m for m in self.mailboxes if m[0] == mailbox))

    def template(self, mailbox: str) -> AddressTemplate | None:
        return next((t for name, t in self.mailboxes if name == mailbox), None)

    @property
    def reply_message_id(self) -> re.Pattern[str]:
        return re.compile(rf"reply-(.+)@{re.escape(self.gitlab_host)}", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Probe:
    """One candidate the rules looked at, for ``explain``."""

    source: str
    value: str
    outcome: str


@dataclass(frozen=True, slots=True)
class Verdict:
    verdict: Literal["deliver", "drop", "reject"]
    reason: str
    mailbox: str | None = None
    key: str | None = None
    handler: str | None = None
    source: str | None = None
    probes: tuple[Probe, ...] = ()

    def as_dict(self) -> dict[str, str]:
        """The ``explain --json`` object: exactly the fields of ../shared/corpus/README.md."""
        if self.verdict == "deliver":
            assert self.mailbox and self.key is not None and self.handler and self.source
            return {
                "verdict": self.verdict,
                "mailbox": self.mailbox,
                "key": self.key,
                "handler": self.handler,
                "source": self.source,
                "reason": self.reason,
            }
        return {"verdict": self.verdict, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class RecipientMatch:
    """The result of looking at an envelope recipient alone (LMTP ``RCPT``)."""

    mailbox: str | None
    key: str | None = None
    handler: str | None = None
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.mailbox is not None and (self.key is None or self.handler is not None)


def match_recipient(table: RoutingTable, rcpt: str) -> RecipientMatch:
    """Which mailbox an envelope recipient belongs to, and its key when the address carries one.

    A recipient is refused when it matches no mailbox, or when its key has a format no GitLab handler
    takes. A dedicated address (no ``%{key}``) is accepted here; its key can only come from the headers.
    """
    for mailbox, template in table.mailboxes:
        if template.has_key:
            key = template.key_from(rcpt)
            if key is None:
                continue
            handler = classify_key(key, mailbox)
            if handler is None:
                return RecipientMatch(mailbox, key, None, f"key {key!r} fits no GitLab handler")
            return RecipientMatch(mailbox, key, handler)
        if template.match(rcpt):
            return RecipientMatch(mailbox)
    return RecipientMatch(None, reason="no GitLab mailbox has this address")


# §2: header candidates in GitLab's order. Each yields (source, candidate address string).
_RAW_SOURCES = (
    ("delivered_to", "Delivered-To"),
    ("x_delivered_to", "X-Delivered-To"),
    ("envelope_to", "Envelope-To"),
    ("x_envelope_to", "X-Envelope-To"),
)
_LATE_RAW_SOURCES = (("x_original_to", "X-Original-To"), ("x_forwarded_to", "X-Forwarded-To"))
_RECEIVED_FOR = re.compile(r"for\s+<([^<]+)>", re.ASCII)
_MESSAGE_ID = re.compile(r"(?!<)[^<>]+(?=>)")


def parsed_addresses(values: Iterable[str]) -> list[str]:
    """Addresses of To/Cc with display names dropped, as Ruby's Mail gem gives them."""
    addresses: list[str] = []
    for value in values:
        try:
            pairs = getaddresses([value])
        except Exception:  # the stdlib parser has raised on hostile input in some releases
            continue
        addresses.extend(address for _, address in pairs if address)
    return addresses


def received_for(values: Iterable[str]) -> Iterator[str]:
    """The first ``for <…>`` of each Received header; headers without one are skipped."""
    for value in values:
        found = _RECEIVED_FOR.search(value)
        if found:
            yield found.group(1)


def _candidates(headers: Headers) -> Iterator[tuple[str, str]]:
    """(source, candidate) in GitLab's order (§2); References gives message ids, the rest addresses."""
    for address in parsed_addresses(headers.get_all("To")):
        yield "to", address
    for value in headers.get_all("References"):
        for message_id in _MESSAGE_ID.findall(value):
            yield "references", message_id
    for source, name in _RAW_SOURCES:
        for value in headers.get_all(name):
            yield source, value
    for address in received_for(headers.get_all("Received")):
        yield "received", address
    for source, name in _LATE_RAW_SOURCES:
        for value in headers.get_all(name):
            yield source, value
    for address in parsed_addresses(headers.get_all("Cc")):
        yield "cc", address


def auto_generated_reason(headers: Headers) -> str | None:
    """Why GitLab would treat the message as auto-generated (§3), or None."""
    for value in headers.get_all("Auto-Submitted"):
        if value.strip() != "no":
            return f"Auto-Submitted: {value.strip()} marks it auto-generated; GitLab drops it without a reply"
    for value in headers.get_all("X-Autoreply"):
        if value.strip() == "yes":
            return "X-Autoreply: yes marks it auto-generated; GitLab drops it without a reply"
    return None


def _find_key(table: RoutingTable, headers: Headers, probes: list[Probe]) -> tuple[str, str, str] | None:
    """Walk the candidates; the first one yielding a key decides mailbox and key: (mailbox, key, source)."""
    reply_id = table.reply_message_id if table.template(INCOMING_EMAIL) else None
    for source, candidate in _candidates(headers):
        if source == "references":
            # A References key always belongs to incoming_email; without that mailbox it is not looked at.
            found = reply_id.fullmatch(candidate) if reply_id else None
            hit = (INCOMING_EMAIL, found.group(1)) if found else None
            miss = f"not reply-KEY@{table.gitlab_host}" if reply_id else "ignored: incoming_email not in scope"
            candidate = f"<{candidate}>"
        else:
            hit = next(
                (
                    (mailbox, key)
                    for mailbox, template in table.mailboxes
                    if (key := template.key_from(candidate)) is not None
                ),
                None,
            )
            miss = "matches no address template"
        if hit:
            probes.append(Probe(source, candidate, f"key {hit[1]!r} for {hit[0]}"))
            return hit[0], hit[1], source
        probes.append(Probe(source, candidate, miss))
    return None


def route(
    table: RoutingTable,
    raw: bytes,
    *,
    rcpt: str | None = None,
    mailbox: str | None = None,
    headers: Headers | None = None,
) -> Verdict:
    """GitLab's verdict on `raw`. `rcpt` is the envelope recipient (authoritative when given); `mailbox`
    restricts routing to one mailbox, as a collector watching that mailbox sees it."""
    scope = table.restricted_to(mailbox)
    if not scope.mailboxes:
        return Verdict("reject", f"mailbox {mailbox!r} is not configured")
    if not raw.strip():
        return Verdict("reject", REASON_BLANK)
    headers = headers if headers is not None else parse_headers(raw)
    auto = auto_generated_reason(headers)
    if auto:
        return Verdict("drop", auto)

    probes: list[Probe] = []
    if rcpt is not None:
        recipient = match_recipient(scope, rcpt)
        if recipient.mailbox is None:
            probes.append(Probe("envelope", rcpt, recipient.reason))
            return Verdict("reject", f"envelope recipient <{rcpt}>: {recipient.reason}", probes=tuple(probes))
        if recipient.key is not None:
            probes.append(Probe("envelope", rcpt, f"key {recipient.key!r} for {recipient.mailbox}"))
            return _decide(recipient.mailbox, recipient.key, "envelope", probes)
        probes.append(Probe("envelope", rcpt, f"dedicated address of {recipient.mailbox}: key must come from headers"))
        scope = scope.restricted_to(recipient.mailbox)

    found = _find_key(scope, headers, probes)
    if found is None:
        return Verdict("reject", REASON_NO_KEY, probes=tuple(probes))
    return _decide(*found, probes)


def _decide(mailbox: str, key: str, source: str, probes: list[Probe]) -> Verdict:
    handler = classify_key(key, mailbox)
    if handler is None:
        return Verdict("reject", REASON_NO_KEY, mailbox, key, None, source, tuple(probes))
    reason = f"key from {source.replace('_', '-')}: {HANDLER_DESCRIPTIONS[handler]} ({mailbox})"
    return Verdict("deliver", reason, mailbox, key, handler, source, tuple(probes))
