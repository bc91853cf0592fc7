"""The header of a message, read the way GitLab's mail library reads it (docs/gitlab-rules.md §3).

GitLab routes on headers only, and reads them with Ruby's mail gem (2.8, the version GitLab pins). Where a
mail server's forgiving reading and the gem's differ, the gem decides where the message goes, so this module
follows the gem:

* a leading mbox ``From `` line is removed, then leading white space (blank lines included) is skipped;
* the header ends at the first empty line: ``\\r?\\n\\r?\\n`` (a line of spaces does not end it);
* line breaks are CRLF, LF or a bare CR; a line starting with a space or a tab continues the field, and
  unfolding removes only the line break (``a\\r\\n  b`` is ``a  b``);
* only the first 1000 lines (fields, and lines that are no field) are read;
* a line without a colon, or whose name is not printable ASCII, is skipped;
* values are stripped of ASCII white space only (a non-breaking space stays);
* To, Cc, References and the other singular fields keep one occurrence: the last one that parses, else the
  first.

It never raises, and the time is linear in the size of the input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmtp_gateway.addresses import RUBY_WHITESPACE, decode_words, parse_address_list, parse_message_ids, ruby_strip

MAX_FIELDS = 1000  # Mail::Header.maximum_amount

_MBOX_FROM = re.compile(r"From[\t\n\v\f\r ]+[^:\t\n\v\f\r ][\x01-\x08\x0b\x0c\x0e-\x7f]*\r?\n")
# the same on bytes: the one character after the spaces may be a UTF-8 sequence, as it is one character to Ruby
_MBOX_FROM_BYTES = re.compile(
    rb"From[\t\n\v\f\r ]+(?:[^:\t\n\v\f\r \x80-\xff]|[\xc2-\xf4][\x80-\xbf]{1,3})[\x01-\x08\x0b\x0c\x0e-\x7f]*\r?\n"
)
_RUBY_WHITESPACE_BYTES = RUBY_WHITESPACE.encode()
_HEADER_END = re.compile(r"\r?\n\r?\n")
_BARE_LINE_END = re.compile(r"(?<!\r)\n|\r(?!\n)")
_FIELD_SPLIT = re.compile(r"\r?\n(?![\t ])")
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_FOLD = re.compile(r"\r?\n([\t ])")

AddressField = list[str | None] | str | None  # the gem's answer: addresses, or the raw value it could not parse
IdField = list[str] | str | None


@dataclass(frozen=True, slots=True)
class Header:
    """Fields in message order, as (name, value); names are compared without regard to ASCII case. `lines` is the
    line (of the first MAX_FIELDS read) each field starts on, for `below`."""

    fields: tuple[tuple[str, str], ...]
    lines: tuple[int, ...] = ()
    folded: tuple[str | None, ...] = ()  # each value before unfolding, where unfolding changed it

    def below(self, prepended: Header, count: int) -> Header:
        """The header of this message with `prepended` (`count` lines) put before it: what the gem reads in a
        copy that starts with the gateway's Return-Path and Delivered-To, without reading the message again."""
        kept = [i for i, line in enumerate(self.lines) if line + count < MAX_FIELDS]
        return Header(
            prepended.fields + tuple(self.fields[i] for i in kept),
            prepended.lines + tuple(self.lines[i] + count for i in kept),
            prepended.folded + tuple(self.folded[i] for i in kept),
        )

    def _occurrences(self, name: str) -> list[tuple[str, str]]:
        """(value, value as written) of each occurrence: a field the gem cannot parse keeps its line breaks."""
        wanted = name.lower()
        return [
            (value, self.folded[i] or value) for i, (field, value) in enumerate(self.fields) if field.lower() == wanted
        ]

    def values(self, name: str) -> list[str]:
        """Every value of the field `name`, in order (the gem's ``Array(mail[:name]).map(&:value)``)."""
        wanted = name.lower()
        return [value for field, value in self.fields if field.lower() == wanted]

    def addresses(self, name: str) -> AddressField:
        """``mail.to``, ``mail.cc``: None without the field, the addresses of the occurrence that counts, or its
        raw value (encoded words decoded) where none parses."""
        occurrences = self._occurrences(name)
        for value, _ in reversed(occurrences):
            parsed = parse_address_list(value)
            if parsed is not None:
                return parsed
        return decode_words(occurrences[0][1]) if occurrences else None

    def message_ids(self, name: str) -> IdField:
        """``mail.references``: None without the field, one id as a plain string, several as a list, or the raw
        value where none parses."""
        occurrences = self._occurrences(name)
        for value, _ in reversed(occurrences):
            ids = parse_message_ids(value)
            if ids is not None:
                return ids[0] if len(ids) == 1 else ids
        return decode_words(occurrences[0][1]) if occurrences else None


def header_text(raw: str) -> str:
    """The part of a message the gem reads as its header."""
    mbox = _MBOX_FROM.match(raw)
    if mbox is not None:
        raw = raw[mbox.end() :]
    raw = raw.lstrip(RUBY_WHITESPACE)
    end = _HEADER_END.search(raw)
    return raw if end is None else raw[: end.start()]


def read_header(raw: bytes) -> Header:
    """The header of `raw`. A message that is not UTF-8 (GitLab only gets UTF-8: see ``eightbit``) is read the way
    the gem reads bytes: a bare CR is then no line break."""
    try:
        text = header_text(raw.decode("utf-8"))
        text = _BARE_LINE_END.sub("\r\n", text).lstrip(RUBY_WHITESPACE)
    except UnicodeDecodeError:
        text = header_text(raw.decode("utf-8", "surrogateescape"))
    fields: list[tuple[str, str]] = []
    lines: list[int] = []
    folded: list[str | None] = []
    for line, piece in enumerate(_FIELD_SPLIT.split(text, MAX_FIELDS)[:MAX_FIELDS]):
        name, colon, value = piece.partition(":")
        name = name.rstrip(RUBY_WHITESPACE)
        if colon and _FIELD_NAME.fullmatch(name):
            value = ruby_strip(value)
            unfolded = _FOLD.sub(r"\1", value)
            fields.append((name, unfolded))
            lines.append(line)
            folded.append(value if unfolded != value else None)
    return Header(tuple(fields), tuple(lines), tuple(folded))


def header_start(raw: bytes) -> int:
    """Where the header starts as the gem sees it: past a leading mbox ``From `` line and white space. A copy
    the gateway prepends headers to must start there, or the gem would read the copy differently."""
    mbox = _MBOX_FROM_BYTES.match(raw)
    skipped = mbox.end() if mbox is not None else 0
    return len(raw) - len(raw[skipped:].lstrip(_RUBY_WHITESPACE_BYTES))
