"""A real Dovecot mailbox for the collector tests: fill it over LMTP, inspect it over IMAP (stdlib imaplib)."""

from __future__ import annotations

import imaplib
import re
import smtplib
from collections.abc import Iterable
from typing import Any

from tests.conftest import numbered_message


def deliver(dovecot: Any, messages: Iterable[bytes]) -> None:
    """Into the user's INBOX through Dovecot's own LMTP service, as Postfix would."""
    with smtplib.LMTP(dovecot.host, dovecot.lmtp_port) as lmtp:
        for raw in messages:
            lmtp.sendmail("alice@example.org", [f"{dovecot.user}@localhost"], raw)


def deliver_numbered(dovecot: Any, numbers: Iterable[int]) -> None:
    deliver(dovecot, (numbered_message(n) for n in numbers))


class Inspector:
    """What the mailbox holds, by UID, with the flags the collector set."""

    def __init__(self, dovecot: Any) -> None:
        self.imap = imaplib.IMAP4(dovecot.host, dovecot.imap_port)
        self.imap.login(dovecot.user, dovecot.password)

    def __enter__(self) -> Inspector:
        self.imap.select("INBOX")
        return self

    def __exit__(self, *exc: object) -> None:
        self.imap.logout()

    def flags(self) -> dict[int, set[str]]:
        self.imap.noop()
        status, data = self.imap.uid("FETCH", "1:*", "(UID FLAGS)")
        assert status == "OK"
        found: dict[int, set[str]] = {}
        for line in data:
            if isinstance(line, bytes) and (match := re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", line)):
                found[int(match.group(1))] = set(match.group(2).decode().split())
        return found

    def unseen_subjects(self) -> set[str]:
        self.imap.noop()
        status, data = self.imap.uid("SEARCH", "UNSEEN")
        assert status == "OK"
        uids = data[0].split()
        if not uids:
            return set()
        status, fetched = self.imap.uid("FETCH", b",".join(uids).decode(), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        return {
            item[1].decode().split(":", 1)[1].strip() for item in fetched if isinstance(item, tuple) and item[1].strip()
        }

    def uidvalidity(self) -> int:
        status, data = self.imap.status("INBOX", "(UIDVALIDITY)")
        assert status == "OK"
        return int(re.search(rb"UIDVALIDITY (\d+)", data[0])[1])

    def mark_unseen(self, uids: Iterable[int]) -> None:
        self.imap.uid("STORE", ",".join(map(str, uids)), "-FLAGS.SILENT", r"(\Seen)")
