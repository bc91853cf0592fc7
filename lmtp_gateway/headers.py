"""The header block of a raw message, read the forgiving way a mail server must.

GitLab routes on headers only, so this is all of the message the rules ever see. It never raises: any byte
sequence gives some (possibly empty) list of headers. CRLF and bare LF line endings are both accepted, folded
lines are unfolded, and bytes that are not UTF-8 are read as Latin-1 so that no header is lost to decoding.
Everything is linear in the size of the input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 5322 field names are printable ASCII without colon; be a little wider and accept any byte but
# whitespace, colon and control characters, as real mail carries odd names.
_FIELD_NAME = re.compile(rb"[^\x00-\x20\x7f:]+")


@dataclass(frozen=True, slots=True)
class Headers:
    """Header fields in message order; look-ups are case-insensitive on the name."""

    fields: tuple[tuple[str, str], ...]

    def get_all(self, name: str) -> list[str]:
        """Every value of the field `name`, unfolded and stripped, in header order."""
        wanted = name.lower()
        return [value for field, value in self.fields if field.lower() == wanted]


def header_block(raw: bytes) -> bytes:
    """The bytes before the first empty line (the whole input when there is none)."""
    if raw.startswith((b"\n", b"\r\n")):
        return b""
    ends = [i for i in (raw.find(b"\n\n"), raw.find(b"\n\r\n")) if i >= 0]
    return raw[: min(ends) + 1] if ends else raw


def _decode(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def parse_headers(raw: bytes) -> Headers:
    """Split `raw` into unfolded (name, value) pairs; lines that are neither a field nor a continuation
    (an mbox ``From `` line, garbage) are skipped, as Ruby's Mail gem does."""
    fields: list[tuple[str, str]] = []
    name: bytes | None = None
    parts: list[bytes] = []

    def flush() -> None:
        if name is not None:
            fields.append((_decode(name), _decode(b" ".join(parts)).strip()))

    for line in header_block(raw).split(b"\n"):
        line = line.removesuffix(b"\r")
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if name is not None:
                parts.append(line.strip())
            continue
        colon = line.find(b":")
        candidate = line[:colon].rstrip(b" \t") if colon > 0 else b""
        flush()
        if candidate and _FIELD_NAME.fullmatch(candidate):
            name, parts = candidate, [line[colon + 1 :].strip()]
        else:
            name, parts = None, []
    flush()
    return Headers(tuple(fields))
