"""What the journal keeps about one copy of a message: its state, its metadata, its identity."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

ID_LENGTH = 24
FORMAT = 2  # of an entry on disk; see FORMATS in the package's docstring


class State(StrEnum):
    PENDING = "pending"
    DEFERRED = "deferred"  # waiting for a retry; its .json's modification time is when the retry is due
    DELIVERED = "delivered"
    DROPPED = "dropped"
    FAILED = "failed"


FINISHED = (State.DELIVERED, State.DROPPED, State.FAILED)
WAITING = (State.PENDING, State.DEFERRED)  # not finished: the dispatcher's work


def fingerprint(raw_digest: bytes, mailbox: str, who: str) -> str:
    """Stable identity of one delivery: the message as received (as a digest), the mailbox and `who`: the
    recipient of a copy, or the GitLab target (key) that a copy routed for delivery carries."""
    return hashlib.sha256(raw_digest + b"\0" + mailbox.encode() + b"\0" + who.encode("utf-8", "replace")).hexdigest()


def envelope_headers(mail_from: str | None, rcpt: str | None) -> bytes:
    """What the gateway prepends: GitLab routes on headers only, so the envelope must become headers."""
    lines = []
    if mail_from is not None:
        lines.append(f"Return-Path: <{mail_from}>\r\n")
    if rcpt is not None:
        lines.append(f"Delivered-To: {rcpt}\r\n")
    return "".join(lines).encode()


@dataclass
class Entry:
    """The metadata kept beside each ``.eml``."""

    id: str
    fingerprint: str
    state: State
    received_at: float
    ingress: str  # lmtp, replay, imap:<mailbox>, graph:<mailbox>
    mail_from: str | None
    rcpt: str | None
    mailbox: str | None
    key: str | None
    handler: str | None
    source: str | None
    reason: str
    size: int  # of the message as received
    stored_size: int = 0  # of the .eml: whoever reads it checks it is whole
    sha256: str | None = None  # of the .eml (format 2)
    prepend: str = ""  # the envelope headers GitLab gets before the .eml (format 2)
    format: int = FORMAT
    drop: str | None = None  # why a dropped copy is not delivered: auto_generated, gitlab_fails, duplicate, rejected
    duplicate_of: str | None = None  # the entry that carries this copy's message to the same GitLab target
    note: str | None = None  # where GitLab's reading of the copy differs from its envelope, in plain words
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: float | None = None
    finished_at: float | None = None
    sink: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        data = {name: getattr(self, name) for name in _ENTRY_FIELDS}  # shallow: asdict's deep copy costs
        # One line: json's C encoder only runs without indent (the indenting one is pure Python and cost a
        # quarter of a millisecond per message). `lmtp-gateway spool show` and jq print it readably.
        return json.dumps(data, ensure_ascii=False).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Entry:
        raw = json.loads(data)
        raw.setdefault("format", 1)  # written before the format was recorded
        entry = cls(**{k: v for k, v in raw.items() if k in _ENTRY_FIELD_SET})
        entry.state = State(entry.state)
        return entry

    def message(self, stored: bytes) -> bytes:
        """The message as GitLab gets it, from the ``.eml``'s bytes."""
        return self.prepend.encode() + stored if self.format >= 2 else stored

    def damage(self, stored: bytes) -> str | None:
        """What is wrong with the ``.eml``'s bytes (None: they are what was committed)."""
        if len(stored) != self.stored_size:
            return f"message file has {len(stored)} bytes, {self.stored_size} were committed"
        if self.sha256 is not None and hashlib.sha256(stored).hexdigest() != self.sha256:
            return "message file does not match its checksum"
        return None


_ENTRY_FIELDS = tuple(f.name for f in fields(Entry))
_ENTRY_FIELD_SET = frozenset(_ENTRY_FIELDS)


@dataclass
class Draft:
    """One copy of an incoming message about to be committed: its entry, the envelope headers GitLab gets before it,
    and the message, in memory or (when large) in a file under tmp/. The drafts of one message share the same
    `body` object, and the journal stores it once for all of them."""

    entry: Entry
    prefix: bytes
    body: bytes | Path
    digest: bytes  # sha256 of `body`
