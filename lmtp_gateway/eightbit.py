"""The message as GitLab gets it: UTF-8, with every reader decoding the sender's text (docs/gitlab-rules.md §8).

A Sidekiq job carries the message as a JSON string, and JSON carries only UTF-8: bytes in another charset used to
become U+FFFD, and the sender's "Grüße aus Köln" reached GitLab as "Gr��e aus K�ln". This module does what
Postfix does for a next hop without 8BITMIME: a body part whose bytes are not UTF-8 is re-encoded as
quoted-printable, its declared charset kept, so that every MIME reader (the mail gem in GitLab's worker among
them) decodes the same text as before. A message that is UTF-8 already passes byte for byte.

- A text part that declares no charset gets ``charset=windows-1252``, the legacy charset such mail is in (and
  what GitLab's own charset detection mostly finds for it); a message without MIME headers gets them.
- Header lines (of the message or of a part) that are not UTF-8 are read in the charset declared for that part,
  else the message's, else windows-1252, and written as UTF-8 (RFC 6532), which the gem reads as it is.
- In a quoted-printable part, stray 8-bit bytes become ``=XX`` (what they decode to anyway); in a base64 part
  they are dropped (base64 decoders skip them).
- Leading white space and an mbox ``From `` line are taken off: the gem skips them in a message alone, and would
  not in a copy that starts with the gateway's Return-Path.

Every step is a single pass over the bytes; nesting deeper than MAX_DEPTH is treated as one opaque part.
"""

from __future__ import annotations

import binascii
import codecs
import re

from lmtp_gateway.headers import header_start

MAX_DEPTH = 20  # multipart and message/rfc822 nesting (Postfix's mime_nesting_limit is 100)
FALLBACK_CHARSET = "windows-1252"

_BODY_START = re.compile(rb"\r?\n\r?\n")
_CONTENT_TYPE = re.compile(rb"(?im)^content-type:[ \t]*((?:[^\r\n]|\r?\n[ \t])*)")
_TRANSFER_ENCODING = re.compile(rb"(?im)^content-transfer-encoding:(?:[^\r\n]|\r?\n[ \t])*")
_PARAMETER = re.compile(rb'(?i);\s*([a-z0-9*_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=\r\n \t]")
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")


def is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def for_gitlab(raw: bytes) -> bytes:
    """`raw` as GitLab must get it: UTF-8 throughout and starting with its header (see the module's docstring).
    The same bytes when nothing needs doing, which is nearly always."""
    start = header_start(raw)
    raw = raw[start:] if start else raw
    if is_utf8(raw):
        return raw
    converted = _entity(raw, 0, None, top=True)
    return converted if is_utf8(converted) else converted.decode("utf-8", "replace").encode()


def _line_end(data: bytes) -> bytes:
    newline = data.find(b"\n")
    return b"\r\n" if newline > 0 and data[newline - 1 : newline] == b"\r" else b"\n"


def _entity(data: bytes, depth: int, inherited: str | None, *, top: bool = False) -> bytes:
    """One MIME entity (the message, a part, an attached message): its header, then its body."""
    split = _BODY_START.search(data)
    if split is None:
        header, separator, body = data, b"", b""
    else:
        header, separator, body = data[: split.start()], data[split.start() : split.end()], data[split.end() :]
    kind, parameters = _content_type(header)
    declared = parameters.get("charset")
    charset = declared or inherited
    if is_utf8(body):
        return _header(header, charset) + separator + body
    if depth < MAX_DEPTH and kind.startswith("multipart/") and parameters.get("boundary"):
        body = _multipart(body, parameters["boundary"].encode("utf-8", "replace"), depth, charset)
    elif depth < MAX_DEPTH and kind == "message/rfc822" and _encoding(header) in (b"", b"7bit", b"8bit", b"binary"):
        body = _entity(body, depth + 1, None)
    else:
        header, body = _leaf(header, body, kind, declared, top=top)
    return _header(header, charset) + separator + body


def _content_type(header: bytes) -> tuple[str, dict[str, str]]:
    """The part's media type (lower case; text/plain when none is given) and its parameters."""
    found = _CONTENT_TYPE.search(header)
    if found is None:
        return "text/plain", {}
    value = re.sub(rb"\r?\n[ \t]", b" ", found[1])
    kind = value.split(b";", 1)[0].strip().lower().decode("ascii", "replace") or "text/plain"
    parameters = {}
    for match in _PARAMETER.finditer(value):
        text = match[2] if match[2] is not None else match[3]
        parameters[match[1].decode("ascii").lower()] = re.sub(rb"\\(.)", rb"\1", text).decode("utf-8", "replace")
    return kind, parameters


def _encoding(header: bytes) -> bytes:
    found = _TRANSFER_ENCODING.search(header)
    return found[0].split(b":", 1)[1].strip().lower() if found else b""


def _multipart(body: bytes, boundary: bytes, depth: int, charset: str | None) -> bytes:
    """Each part between the delimiter lines, converted on its own; the delimiters and the line ends as they were.
    The preamble and the epilogue are read by nobody: made UTF-8 like a header line."""
    delimiter = re.compile(rb"(?m)^--" + re.escape(boundary) + rb"(--)?[ \t]*\r?$")
    out: list[bytes] = []
    position = 0
    inside = False
    for found in delimiter.finditer(body):
        segment = body[position : found.start()]
        if inside:
            end = _line_end(segment)
            content = segment[: -len(end)] if segment.endswith(end) else segment  # the break before the delimiter
            out.append(_entity(content, depth + 1, charset) + segment[len(content) :])
        else:
            out.append(_text_line(segment, charset))
        out.append(found[0])
        position = found.end()
        inside = found[1] is None
        if not inside:
            break
    rest = body[position:]  # the epilogue, or a last part that no closing delimiter ends
    out.append(_entity(rest, depth + 1, charset) if inside else _text_line(rest, charset))
    return b"".join(out)


def _leaf(header: bytes, body: bytes, kind: str, declared: str | None, *, top: bool) -> tuple[bytes, bytes]:
    """A body part that is not UTF-8: re-encoded so that it decodes to the same text, and its header saying so."""
    encoding = _encoding(header)
    if encoding == b"base64":
        return header, _NOT_BASE64.sub(b"", body)
    if encoding == b"quoted-printable":
        return header, _EIGHT_BIT.sub(lambda m: b"=%02X" % m[0][0], body)
    end = _line_end(header + b"\n" + body)
    if declared is None and kind.startswith("text/"):
        header = _with_charset(header, kind, end, top=top)
    body = binascii.b2a_qp(body, istext=True)
    fields = _TRANSFER_ENCODING.sub(b"Content-Transfer-Encoding: quoted-printable", header, count=1)
    if fields == header:
        fields = header + end + b"Content-Transfer-Encoding: quoted-printable"
    return fields, body


def _with_charset(header: bytes, kind: str, end: bytes, *, top: bool) -> bytes:
    """A Content-Type with the fallback charset added (and, on a message without any, MIME's headers)."""
    found = _CONTENT_TYPE.search(header)
    if found is not None:
        return header[: found.end()] + f"; charset={FALLBACK_CHARSET}".encode() + header[found.end() :]
    added = f"Content-Type: {kind}; charset={FALLBACK_CHARSET}".encode()
    if top and not re.search(rb"(?im)^mime-version:", header):
        added = b"MIME-Version: 1.0" + end + added
    return header + end + added


def _header(header: bytes, charset: str | None) -> bytes:
    """A header block, each line that is not UTF-8 read in `charset` (else windows-1252) and written as UTF-8."""
    if is_utf8(header):
        return header
    return b"\n".join(_text_line(line, charset) for line in header.split(b"\n"))


def _text_line(line: bytes, charset: str | None) -> bytes:
    if is_utf8(line):
        return line
    for name in (charset, FALLBACK_CHARSET):
        if name is None:
            continue
        try:
            codecs.lookup(name)
            return line.decode(name).encode()
        except (LookupError, UnicodeDecodeError):
            continue
    return line.decode("latin-1").encode()
