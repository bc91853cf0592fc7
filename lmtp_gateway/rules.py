"""GitLab's incoming-mail routing rules, as pure functions (docs/gitlab-rules.md).

Given a copy of a message as GitLab will receive it, and the mailbox (GitLab worker) it goes to, decide exactly
what GitLab decides: the key and the handler that takes it, or that the mail is auto-generated (dropped silently)
or cannot be routed (rejected). Over LMTP the envelope recipient decides only whether a recipient is accepted at
RCPT; the verdict is GitLab's reading of the copy, which starts with the ``Delivered-To`` the gateway prepends.

Nothing here does I/O and nothing raises on any input. Every check is linear in the length of what it looks at:
the handler formats are written as searches that cannot backtrack more than once over any character, because a
key is whatever a sender puts into an address.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from lmtp_gateway.eightbit import for_gitlab
from lmtp_gateway.errors import TemplateError
from lmtp_gateway.headers import Header, read_header

INCOMING_EMAIL = "incoming_email"
SERVICE_DESK_EMAIL = "service_desk_email"
MAILBOX_TYPES = (INCOMING_EMAIL, SERVICE_DESK_EMAIL)

KEY_PLACEHOLDER = "%{key}"

# GitLab's own rejection texts (§7), verbatim.
REASON_NO_KEY = (
    "We couldn't figure out what the email is for. Please create your issue or comment through the web interface."
)
REASON_BLANK = (
    "It appears that the email is blank. Make sure your reply is at the top of the email, we can't process "
    "inline replies."
)
REASON_PROJECT_NOT_FOUND = "We couldn't find the project. Please check if there's any typo."

NO_SERVICE_DESK = f"GitLab's Service Desk needs an incoming_email address with {KEY_PLACEHOLDER}"

HANDLER_DESCRIPTIONS = {
    "create_note": "reply to a notification",
    "create_issue": "new issue by email",
    "create_note_on_issuable": "comment on an issue by email",
    "unsubscribe": "unsubscribe from notifications",
    "create_merge_request": "new merge request by email",
    "service_desk": "Service Desk",
}

# --- §6 handler formats ---
# Ruby's \d and \w are ASCII-only (re.ASCII), and its "." stops only at "\n". A GitLab format such as
# (?<slug>.+)-(?<project_id>\d+)-(?<token>.+)-issue backtracks quadratically when written as one regex; each is
# checked here by its suffix and one search for "-<digits>-" with something on both sides, which is the same set
# of keys (the slug and the token may hold anything but a line break).

_B36 = "[0-9a-z]"
_FULL_REPLY_KEY = rf"(?:[a-f0-9]{{32}}|{_B36}{{1,4}}-{_B36}{{25}}(?:-{_B36}{{1,13}})?)"
_CREATE_NOTE = re.compile(_FULL_REPLY_KEY, re.ASCII)
_UNSUBSCRIBE = re.compile(rf"{_FULL_REPLY_KEY}(?:-unsubscribe|\+unsubscribe)", re.ASCII)
_SLUG_ID_TOKEN = re.compile(r".-\d+-.", re.ASCII)  # slug "-" project id "-" token, each part not empty
_SLUG_ID = re.compile(r".-\d+\Z", re.ASCII)  # slug "-" project id, to the end
_ISSUE_IID = re.compile(r"-issue-\d+\Z", re.ASCII)


def _slug_id_token(text: str) -> bool:
    return "\n" not in text and _SLUG_ID_TOKEN.search(text) is not None


def _is_create_issue(key: str) -> bool:
    if "/" not in key and key.endswith("-issue") and _slug_id_token(key[: -len("-issue")]):
        return True
    _, plus, token = key.partition("+")  # legacy: path+token, the token without "+" or a line break
    return bool(plus) and "+" not in token and "\n" not in token and "+unsubscribe" not in key


def _is_create_note_on_issuable(key: str) -> bool:
    found = _ISSUE_IID.search(key)
    return found is not None and _slug_id_token(key[: found.start()])


def _is_create_merge_request(key: str) -> bool:
    if "/" not in key and key.endswith("-merge-request") and _slug_id_token(key[: -len("-merge-request")]):
        return True
    plus = key.find("+")  # legacy: path+merge-request+token, a prefix match in GitLab (not end-anchored)
    return plus >= 0 and key.startswith("+merge-request+", plus)


def _is_service_desk(key: str) -> bool:
    if "/" not in key and key.endswith("-issue-"):
        head = key[: -len("-issue-")]
        if "\n" not in head and _SLUG_ID.search(head):
            return True
    return "/" in key and "+" not in key  # legacy: a project path


_INCOMING_HANDLERS = (
    ("create_note", lambda key: _CREATE_NOTE.fullmatch(key) is not None),
    ("create_issue", _is_create_issue),
    ("create_note_on_issuable", _is_create_note_on_issuable),
    ("unsubscribe", lambda key: _UNSUBSCRIBE.fullmatch(key) is not None),
    ("create_merge_request", _is_create_merge_request),
    ("service_desk", _is_service_desk),
)


def classify_key(key: str, mailbox: str = INCOMING_EMAIL, *, service_desk: bool = True) -> str | None:
    """The GitLab handler that would take `key` arriving in `mailbox`, or None (UnknownIncomingEmail).
    `service_desk`: whether GitLab's Service Desk works at all (incoming_email has a ``%{key}`` address)."""
    if mailbox == SERVICE_DESK_EMAIL:
        return "service_desk"  # GitLab's Service Desk receiver takes any key (§6)
    for handler, matches in _INCOMING_HANDLERS:
        if matches(key) and (handler != "service_desk" or service_desk):
            return handler
    return None


# --- §2 address templates ---


@dataclass(frozen=True, slots=True)
class AddressTemplate:
    """A mailbox's ``address``, e.g. ``incoming+%{key}@incoming.example.com``."""

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
        return cls(text, re.compile(f"<?{body}>?"))  # no DOTALL: Ruby's "." stops at a line break too

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


def _reply_id_pattern(host: str) -> re.Pattern[str]:
    """GitLab's ``\\Areply-(.+)@#{gitlab.host}\\z``: the host goes into the regex as it is, so its dots match
    any character but a line break."""
    return re.compile("reply-(.+)@" + ".".join(re.escape(part) for part in host.split(".")))


@dataclass(frozen=True)
class RoutingTable:
    """What the rules need to know about a GitLab instance: its host, its mailboxes in GitLab's order, the Service
    Desk custom email addresses registered in its projects (address → the project's Service Desk key)."""

    gitlab_host: str
    mailboxes: tuple[tuple[str, AddressTemplate], ...]
    custom_emails: Mapping[str, str] = field(default_factory=dict)
    reply_id: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reply_id", _reply_id_pattern(self.gitlab_host))

    def restricted_to(self, mailbox: str | None) -> RoutingTable:
        if mailbox is None:
            return self
        return RoutingTable(self.gitlab_host, tuple(m for m in self.mailboxes if m[0] == mailbox), self.custom_emails)

    def template(self, mailbox: str) -> AddressTemplate | None:
        return next((t for name, t in self.mailboxes if name == mailbox), None)

    @property
    def service_desk(self) -> bool:
        """GitLab's Service Desk works only with an incoming_email address that has ``%{key}`` (§6). Without an
        incoming_email in this configuration nothing is known of GitLab's, and it is assumed to have one."""
        incoming = self.template(INCOMING_EMAIL)
        return incoming is None or incoming.has_key


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
    note: str | None = None  # where GitLab's reading differs from the envelope's, in plain words
    drop: str | None = None  # for "drop": auto_generated, or gitlab_fails (GitLab's receiver would raise)

    def as_dict(self) -> dict[str, str]:
        """The ``explain --json`` object."""
        data = {"verdict": self.verdict, "reason": self.reason}
        if self.verdict == "deliver":
            assert self.mailbox and self.key is not None and self.handler and self.source
            data = {**data, "mailbox": self.mailbox, "key": self.key, "handler": self.handler, "source": self.source}
        elif self.key is not None:  # rejected: the key GitLab finds first fits no handler
            data = {**data, "key": self.key, "source": self.source or ""}
        if self.drop:
            data["drop"] = self.drop
        if self.note:
            data["note"] = self.note
        return data


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

    A recipient is refused when it matches no mailbox, or when its key has a format no GitLab handler takes. A
    dedicated address (no ``%{key}``) is accepted here; GitLab can only find its key in the headers.
    """
    for mailbox, template in table.mailboxes:
        if mailbox == SERVICE_DESK_EMAIL and not table.service_desk and template.match(rcpt):
            return RecipientMatch(mailbox, template.key_from(rcpt) or "", None, NO_SERVICE_DESK)
        if template.has_key:
            key = template.key_from(rcpt)
            if key is None:
                continue
            handler = classify_key(key, mailbox, service_desk=table.service_desk)
            if handler is None:
                return RecipientMatch(mailbox, key, None, f"key {key!r} fits no GitLab handler")
            return RecipientMatch(mailbox, key, handler)
        if template.match(rcpt):
            return RecipientMatch(mailbox)
    return RecipientMatch(None, reason="no GitLab mailbox has this address")


# --- §4 GitLab's key search ---

_RECEIVED_FOR = re.compile(r"for\s+<([^<]+)>", re.ASCII)
_RAW_SOURCES = (  # in GitLab's order, after To and References; values as written (not address-parsed)
    ("delivered_to", "Delivered-To"),
    ("x_delivered_to", "X-Delivered-To"),
    ("envelope_to", "Envelope-To"),
    ("x_envelope_to", "X-Envelope-To"),
)
_LATE_RAW_SOURCES = (("x_original_to", "X-Original-To"), ("x_forwarded_to", "X-Forwarded-To"))
_CUSTOM_REPLY = re.compile(r"\+([0-9a-f]{32})@")
_CUSTOM_EMAIL = re.compile(r"(?:[a-zA-Z0-9]|[\-._])+@[\w\-.]+\.[a-zA-Z]{2,63}", re.ASCII)
_ID_IN_BRACKETS = re.compile(r"[^<>]+")
VERIFY_SUBADDRESS = "+verify"


def received_for(values: Iterable[str]) -> Iterator[str]:
    """The first ``for <…>`` of each Received header; headers without one are skipped."""
    for value in values:
        found = _RECEIVED_FOR.search(value)
        if found:
            yield found.group(1)


def scanned_ids(text: str) -> list[str]:
    """GitLab's fallback for a References it got as one string: ``scan(/(?!<)[^<>]+(?=>)/)``, which finds each
    longest run without angle brackets that a ``>`` ends (in one pass, where the regex would be quadratic)."""
    return [m.group() for m in _ID_IN_BRACKETS.finditer(text) if text.startswith(">", m.end())]


def _as_list(value: list[str | None] | str | None) -> list[str | None]:
    """Ruby's ``Array(x)``."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def _candidates(header: Header) -> Iterator[tuple[str, str | None]]:
    """(source, candidate) in GitLab's order (§4), after To."""
    references = header.message_ids("References")
    for message_id in scanned_ids(references) if isinstance(references, str) else _as_list(references):
        yield "references", message_id
    for source, name in _RAW_SOURCES:
        for value in header.values(name):
            yield source, value
    for address in received_for(header.values("Received")):
        yield "received", address
    for source, name in _LATE_RAW_SOURCES:
        for value in header.values(name):
            yield source, value
    for address in _as_list(header.addresses("Cc")):
        yield "cc", address


def _custom_reply_key(table: RoutingTable, address: str) -> str | None:
    """A reply to a notification GitLab sent from a Service Desk custom email (16.4+): ``local+<reply key>@domain``
    of a registered custom address."""
    reply = _CUSTOM_REPLY.search(address) if table.custom_emails else None
    if reply is None:
        return None
    plain = address.replace(f"+{reply[1]}", "", 1)
    return reply[1] if _CUSTOM_EMAIL.fullmatch(plain) and plain in table.custom_emails else None


def _custom_email_key(table: RoutingTable, address: str) -> tuple[str, str] | None:
    """A registered custom address itself, or its ``+verify`` form: the project's Service Desk key, and what the
    address is."""
    plain = address.replace(VERIFY_SUBADDRESS, "", 1) if table.custom_emails else None
    if plain is None or plain not in table.custom_emails:
        return None
    if plain != address:
        return table.custom_emails[plain], f"verification mail for the custom email {plain}: no ticket"
    return table.custom_emails[plain], f"the Service Desk custom email {plain}"


@dataclass(frozen=True, slots=True)
class FoundKey:
    key: str
    source: str
    detail: str | None = None  # a Service Desk custom email, in words


def find_key(table: RoutingTable, header: Header, mailbox: str, probes: list[Probe]) -> FoundKey | None:
    """Walk the candidates the way GitLab's receiver for `mailbox` does; the first one yielding a key decides.
    Each To address is looked at three ways, in GitLab's order: a custom email's reply address, the mailbox's
    template, a custom email itself."""
    template = table.template(mailbox)
    assert template is not None
    for address in _as_list(header.addresses("To")):
        if address is None:
            probes.append(Probe("to", "(an address the gem keeps without local part or domain)", "no key"))
            continue
        if (key := _custom_reply_key(table, address)) is not None:
            probes.append(Probe("to", address, f"key {key!r}: a reply through a Service Desk custom email"))
            return FoundKey(key, "to", "a reply through a Service Desk custom email")
        if (key := template.key_from(address)) is not None:
            probes.append(Probe("to", address, f"key {key!r} for {mailbox}"))
            return FoundKey(key, "to")
        if (custom := _custom_email_key(table, address)) is not None:
            probes.append(Probe("to", address, f"key {custom[0]!r}: {custom[1]}"))
            return FoundKey(custom[0], "to", custom[1])
        probes.append(Probe("to", address, f"does not match {template.text}"))
    for source, candidate in _candidates(header):
        if candidate is None:
            continue
        if source == "references":
            found = table.reply_id.fullmatch(candidate)
            if found:
                probes.append(Probe(source, f"<{candidate}>", f"key {found[1]!r} (reply-KEY@{table.gitlab_host})"))
                return FoundKey(found[1], source)
            probes.append(Probe(source, f"<{candidate}>", f"not reply-KEY@{table.gitlab_host}"))
            continue
        key = template.key_from(candidate)
        if key is not None:
            probes.append(Probe(source, candidate, f"key {key!r} for {mailbox}"))
            return FoundKey(key, source)
        probes.append(Probe(source, candidate, f"does not match {template.text}"))
    return None


def _single(header: Header, name: str) -> tuple[int, str | None]:
    values = header.values(name)
    return len(values), values[0] if values else None


def auto_generated_reason(header: Header) -> tuple[str, str] | None:
    """Why GitLab would not process the message at all (§5): (kind, reason), kind "auto_generated" (GitLab drops
    it without a reply) or "gitlab_fails" (a repeated Auto-Submitted or X-Autoreply makes GitLab's receiver raise
    an error; no reply either). None when GitLab goes on to look for a key.

    Auto-Submitted is RFC 3834's mark of a message no human sent (any value but "no"); X-Autoreply is the older
    mark some vacation programs still set. GitLab honours both so that two robots never answer each other."""
    for name in ("Auto-Submitted", "X-Autoreply"):
        count, _ = _single(header, name)
        if count > 1:
            reason = f"{count} {name} headers: GitLab's receiver fails on them and never processes the mail"
            return "gitlab_fails", reason
    count, value = _single(header, "Auto-Submitted")
    if count and value != "no":
        return "auto_generated", f"Auto-Submitted: {value} marks it auto-generated; GitLab drops it without a reply"
    if _single(header, "X-Autoreply")[1] == "yes":
        return "auto_generated", "X-Autoreply: yes marks it auto-generated; GitLab drops it without a reply"
    return None


def gitlab_verdict(table: RoutingTable, header: Header, mailbox: str, *, probes: list[Probe] | None = None) -> Verdict:
    """What GitLab's receiver for `mailbox` decides about a copy with this header (not blank: GitLab gets it with
    the gateway's Return-Path and Delivered-To before it)."""
    probes = [] if probes is None else probes
    skipped = auto_generated_reason(header)
    if skipped is not None:
        return Verdict("drop", skipped[1], mailbox, probes=tuple(probes), drop=skipped[0])
    found = find_key(table, header, mailbox, probes)
    if found is None:
        return Verdict("reject", REASON_NO_KEY, mailbox, probes=tuple(probes))
    handler = classify_key(found.key, mailbox, service_desk=table.service_desk)
    if handler is None:
        return Verdict("reject", REASON_NO_KEY, mailbox, found.key, None, found.source, tuple(probes))
    if handler == "service_desk" and not table.service_desk:
        reason = f"{REASON_PROJECT_NOT_FOUND} ({NO_SERVICE_DESK})"
        return Verdict("reject", reason, mailbox, found.key, None, found.source, tuple(probes))
    reason = f"key from {found.source.replace('_', '-')}: {HANDLER_DESCRIPTIONS[handler]} ({mailbox})"
    if found.detail:
        reason += f"; {found.detail}"
    return Verdict("deliver", reason, mailbox, found.key, handler, found.source, tuple(probes))


def envelope_header(rcpt: str | None, mail_from: str | None = None) -> tuple[Header, int]:
    """The lines the gateway prepends to each copy, read as the gem reads them, and how many lines they are."""
    lines = []
    if mail_from is not None:
        lines.append(f"Return-Path: <{mail_from}>")
    if rcpt is not None:
        lines.append(f"Delivered-To: {rcpt}")
    return read_header("\r\n".join(lines).encode() + b"\r\n\r\n"), len(lines)


def copy_verdict(table: RoutingTable, header: Header, rcpt: str, mailbox: str, envelope_key: str | None) -> Verdict:
    """GitLab's verdict on the copy for `rcpt` (in `mailbox`, as accepted at RCPT), and a note where GitLab's key
    is not the envelope's."""
    prepended, count = envelope_header(rcpt)
    probes = [Probe("envelope", rcpt, f"accepted for {mailbox}; GitLab reads the copy, Delivered-To: {rcpt} first")]
    verdict = gitlab_verdict(table, header.below(prepended, count), mailbox, probes=probes)
    if envelope_key is not None and verdict.key != envelope_key:
        if verdict.verdict == "deliver":
            note = f"sent to {rcpt}, but GitLab will route this copy by {verdict.source} to key {verdict.key!r}"
        elif verdict.verdict == "reject":
            note = f"sent to {rcpt}, but GitLab finds {verdict.source or 'no key'} first and rejects this copy"
        else:
            note = None
        if note:
            verdict = dataclasses.replace(verdict, note=note)
    return verdict


def route(table: RoutingTable, raw: bytes, *, rcpt: str | None = None, mailbox: str | None = None) -> Verdict:
    """GitLab's verdict on `raw` (``explain``, ``replay``). With `rcpt`, as a copy delivered over LMTP: the
    recipient must be accepted at RCPT, and GitLab reads the copy with the ``Delivered-To`` the gateway prepends.
    With `mailbox` (a collector's), as GitLab's receiver for that mailbox. With neither, every configured mailbox
    is tried in GitLab's order and the first that finds a key decides."""
    scope = table.restricted_to(mailbox)
    if not scope.mailboxes:
        return Verdict("reject", f"mailbox {mailbox!r} is not configured")
    raw = for_gitlab(raw)  # what GitLab will read: UTF-8, starting with its header
    if rcpt is not None:
        recipient = match_recipient(scope, rcpt)
        if not recipient.accepted:
            probes = (Probe("envelope", rcpt, recipient.reason),)
            return Verdict("reject", f"envelope recipient <{rcpt}>: {recipient.reason}", probes=probes)
        assert recipient.mailbox is not None
        return copy_verdict(table, read_header(raw), rcpt, recipient.mailbox, recipient.key)
    if not raw.strip():
        return Verdict("reject", REASON_BLANK)
    header = read_header(raw)
    verdicts = [gitlab_verdict(table, header, name) for name, _ in scope.mailboxes]
    return next((v for v in verdicts if v.key is not None or v.verdict == "drop"), verdicts[-1])
