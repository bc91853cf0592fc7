"""Address lists and message-id lists, read the way GitLab's mail library reads them (docs/gitlab-rules.md §3).

GitLab finds keys in ``mail.to``, ``mail.cc`` and ``mail.references`` of Ruby's mail gem. What those give is not
what Python's ``email.utils`` gives, and the difference decides where a message goes:

* an address list that parses gives its addresses (``local@domain``, display names and comments dropped, quotes
  and an obsolete route ``@relay:`` kept); one that does not parse, even by a single bad element, gives the whole
  raw value as one string, which GitLab then matches against the address template like any address;
* a message-id list gives its ids without brackets when it holds two or more; a single id comes back as a plain
  string, in which GitLab's fallback scan for ``<…>`` finds nothing; a list that does not parse is scanned.

Everything here is a single left-to-right pass over the value (comments nest, but are read with a counter), so
the time is linear in the length of the value, whatever it holds.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from dataclasses import dataclass

RUBY_WHITESPACE = "\0\t\n\v\f\r "  # what Ruby's String#strip removes, and nothing else (no Unicode spaces)


def ruby_strip(text: str) -> str:
    return text.strip(RUBY_WHITESPACE)


# --- the lexical tokens of RFC 5322 §3.2, as the gem's grammar has them (with RFC 6532's UTF-8) ---

_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_OBS_CTL = frozenset(chr(c) for c in (*range(1, 9), 11, 12, *range(14, 32), 127))
_SPECIALS = frozenset("<>@,;:.")
_WSP = frozenset(" \t")


def _is_atext(char: str) -> bool:
    return char in _ATEXT or char >= "\x80"


def _is_ctext(char: str) -> bool:  # comment text: printable but ( ) \, obsolete controls, UTF-8
    return ("\x21" <= char <= "\x7e" and char not in "()\\") or char in _OBS_CTL or char >= "\x80"


def _is_qtext(char: str) -> bool:  # quoted-string text: printable but " \, obsolete controls, UTF-8
    return ("\x21" <= char <= "\x7e" and char not in '"\\') or char in _OBS_CTL or char >= "\x80"


def _is_dtext(char: str) -> bool:  # domain-literal text: printable but [ \ ], obsolete controls, UTF-8
    return ("\x21" <= char <= "\x7e" and char not in "[\\]") or char in _OBS_CTL or char >= "\x80"


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # atom quoted comment literal ws, or the special character itself: < > @ , ; : .
    text: str  # as written (a quoted string with its quotes, a comment with its parentheses)
    start: int


class _Unparsable(Exception):
    pass


def _tokens(value: str) -> list[Token]:
    """The value as tokens; _Unparsable for a character no address may hold where it stands, or a quoted string,
    comment or domain literal left open."""
    tokens: list[Token] = []
    position, end = 0, len(value)
    while position < end:
        char = value[position]
        start = position
        if char in _WSP:
            while position < end and value[position] in _WSP:
                position += 1
            tokens.append(Token("ws", value[start:position], start))
        elif _is_atext(char):
            while position < end and _is_atext(value[position]):
                position += 1
            tokens.append(Token("atom", value[start:position], start))
        elif char in _SPECIALS:
            tokens.append(Token(char, char, start))
            position += 1
        elif char == '"':
            position = _close(value, position + 1, '"', _is_qtext)
            tokens.append(Token("quoted", value[start:position], start))
        elif char == "(":
            position = _close_comment(value, position + 1)
            tokens.append(Token("comment", value[start:position], start))
        elif char == "[":
            position = _close(value, position + 1, "]", _is_dtext)
            tokens.append(Token("literal", value[start:position], start))
        else:
            raise _Unparsable
    return tokens


def _close(value: str, position: int, closing: str, allowed: object) -> int:
    """Past the `closing` character of a quoted string or domain literal: its text, spaces and quoted pairs."""
    end = len(value)
    while position < end:
        char = value[position]
        if char == closing:
            return position + 1
        if char == "\\" and position + 1 < end:
            position += 2
        elif char in _WSP or allowed(char):  # type: ignore[operator]
            position += 1
        else:
            raise _Unparsable
    raise _Unparsable


def _close_comment(value: str, position: int) -> int:
    depth, end = 1, len(value)
    while position < end:
        char = value[position]
        if char == "\\" and position + 1 < end:
            position += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if not depth:
                return position + 1
        elif not (char in _WSP or _is_ctext(char)):
            raise _Unparsable
        position += 1
    raise _Unparsable


def _is_cfws(token: Token) -> bool:
    return token.kind in ("ws", "comment")


def _is_word(token: Token) -> bool:
    return token.kind in ("atom", "quoted")


def _is_quoted_text(token: Token) -> bool:
    """A quoted string inside a dot-atom must hold something besides spaces (RFC 5322's obsolete local part)."""
    return token.kind == "quoted" and bool(token.text[1:-1].strip(" \t"))


def _text(tokens: list[Token]) -> str:
    return "".join(token.text for token in tokens)


def _strip_cfws(tokens: list[Token]) -> tuple[int, int]:
    """The first and past-the-last index of what is not comment or white space."""
    first, last = 0, len(tokens)
    while first < last and _is_cfws(tokens[first]):
        first += 1
    while last > first and _is_cfws(tokens[last - 1]):
        last -= 1
    return first, last


def _cfws_attached_to_words(tokens: list[Token]) -> bool:
    """In a phrase, white space and comments belong to a word (RFC 5322's ``word = [CFWS] atom [CFWS]``): a run of
    them must touch an atom or a quoted string. The run at the very end may belong to what follows the phrase."""
    for index, token in enumerate(tokens):
        if not _is_cfws(token) or (index and _is_cfws(tokens[index - 1])):
            continue
        run_end = index
        while run_end < len(tokens) and _is_cfws(tokens[run_end]):
            run_end += 1
        before = index > 0 and _is_word(tokens[index - 1])
        after = run_end < len(tokens) and _is_word(tokens[run_end])
        if not (before or after or run_end == len(tokens)):
            return False
    return True


def _is_phrase(tokens: list[Token], *, open_end: bool) -> bool:
    """A display name: words, dots and at-signs (the obsolete phrase), at least one of them."""
    first, last = _strip_cfws(tokens)
    if first == last:
        return False
    if any(t.kind not in ("atom", "quoted", ".", "@") and not _is_cfws(t) for t in tokens):
        return False
    if first and not _is_word(tokens[first]):
        return False  # leading space or comment before a dot: it belongs to no word
    if not open_end and last < len(tokens) and not _is_word(tokens[last - 1]):
        return False
    return _cfws_attached_to_words(tokens)


# --- addresses ---


@dataclass
class _Mailbox:
    local: str | None
    domain: str | None
    route: str = ""
    comments: tuple[str, ...] = ()

    def address(self) -> str | None:
        """As Mail::Address#address gives it."""
        domain = None
        if self.domain is not None:
            domain = self.domain
            for comment in self.comments:
                domain = domain.replace(f"({comment})", "")
            domain = decode_words(ruby_strip(domain))
        local = None if self.local is None else decode_words(self.route + ruby_strip(self.local))
        if domain is None:
            return local
        return f"{local or ''}@{domain}"


def _local_part(tokens: list[Token], *, has_domain: bool, in_angle: bool) -> str | None:
    """The local part's text as the gem keeps it; _Unparsable if it is none. None: parsed, but not kept."""
    first, last = _strip_cfws(tokens)
    core = tokens[first:last]
    if not core:
        raise _Unparsable
    if not any(_is_cfws(t) for t in core):
        if len(core) == 1 and core[0].kind == "quoted":  # a quoted string: kept as such
            return None if in_angle and not has_domain else core[0].text
        if not all(t.kind == "." or t.kind == "atom" or _is_quoted_text(t) for t in core):
            raise _Unparsable
        if not any(_is_word(t) for t in core):
            raise _Unparsable
        if in_angle and not has_domain:
            return None  # <local> without a domain: accepted, and no address kept
        if last < len(tokens) and tokens[last].kind == "comment":
            return "" if has_domain else None  # the gem loses a local part a comment is glued to
        return _text(tokens[first:] if has_domain else core)
    # the obsolete local part: words separated by single dots, with comments and spaces around the words
    if any(not (_is_word(t) or t.kind == "." or _is_cfws(t)) for t in core):
        raise _Unparsable
    previous = "."  # words and single dots, alternating, a word first and last
    for token in (t for t in core if not _is_cfws(t)):
        if (token.kind == ".") == (previous == "."):
            raise _Unparsable
        previous = token.kind
    if previous == ".":
        raise _Unparsable
    return "" if has_domain else None


def _domain(tokens: list[Token]) -> str:
    """The domain's text as written (the gem strips its comments and spaces later); _Unparsable if it is none."""
    first, last = _strip_cfws(tokens)
    core = tokens[first:last]
    if not core:
        raise _Unparsable
    if len(core) == 1 and core[0].kind == "literal":
        return _text(tokens).rstrip(RUBY_WHITESPACE)
    if not any(_is_cfws(t) for t in core):  # dot-atom: dots and words, ending with a word
        if all(t.kind in ("atom", "quoted", ".") for t in core) and _is_word(core[-1]):
            return _text(tokens).rstrip(RUBY_WHITESPACE)
        raise _Unparsable
    # the obsolete domain: atoms separated by single dots, with comments and spaces around them
    previous = "."
    for token in (t for t in core if not _is_cfws(t)):
        if token.kind == "atom" and previous == ".":
            previous = "atom"
        elif token.kind == "." and previous == "atom":
            previous = "."
        else:
            raise _Unparsable
    if previous != "atom":
        raise _Unparsable
    return _text(tokens).rstrip(RUBY_WHITESPACE)


def _addr_spec(tokens: list[Token], *, in_angle: bool) -> _Mailbox:
    at = next((i for i, t in enumerate(tokens) if t.kind == "@"), None)
    if at is None:
        return _Mailbox(_local_part(tokens, has_domain=False, in_angle=in_angle), None)
    return _Mailbox(_local_part(tokens[:at], has_domain=True, in_angle=in_angle), _domain(tokens[at + 1 :]))


def _route(tokens: list[Token]) -> None:
    """An obsolete source route before the address in angle brackets: ``@a,@b:``."""
    position = 0
    while position < len(tokens) and (_is_cfws(tokens[position]) or tokens[position].kind == ","):
        position += 1
    while True:
        if position >= len(tokens) or tokens[position].kind != "@":
            raise _Unparsable
        end = position + 1
        while end < len(tokens) and tokens[end].kind != ",":
            end += 1
        _domain(tokens[position + 1 : end])
        if end == len(tokens):
            return
        position = end + 1
        while position < len(tokens) and _is_cfws(tokens[position]):
            position += 1
        if position == len(tokens):
            return
        if tokens[position].kind != "@":
            raise _Unparsable


def _mailbox(tokens: list[Token]) -> _Mailbox:
    comments = tuple(t.text[1:-1] for t in tokens if t.kind == "comment")
    opening = next((i for i, t in enumerate(tokens) if t.kind == "<"), None)
    if opening is None:
        found = _addr_spec(tokens, in_angle=False)
        found.comments = comments
        return found
    closing = next((i for i in range(opening + 1, len(tokens)) if tokens[i].kind == ">"), None)
    if closing is None or any(t.kind in ("<", ">") for t in tokens[opening + 1 : closing]):
        raise _Unparsable
    if any(not _is_cfws(t) for t in tokens[closing + 1 :]):
        raise _Unparsable
    name = tokens[:opening]
    if _strip_cfws(name)[0] < len(name) and not _is_phrase(name, open_end=True):
        raise _Unparsable
    inside = tokens[opening + 1 : closing]
    colon = next((i for i, t in enumerate(inside) if t.kind == ":"), None)
    route = ""
    if colon is not None:
        _route(inside[:colon])
        route = _text(inside[: colon + 1])
        inside = inside[colon + 1 :]
    found = _addr_spec(inside, in_angle=True)
    found.route, found.comments = route, comments
    return found


def _split(tokens: list[Token], separators: str) -> list[tuple[list[Token], str]]:
    """Items between separators outside angle brackets, each with the separator that ends it ('' for the last)."""
    items: list[tuple[list[Token], str]] = []
    current: list[Token] = []
    inside = False
    for token in tokens:
        if token.kind == "<":
            inside = True
        elif token.kind == ">":
            inside = False
        elif not inside and token.kind in separators:
            items.append((current, token.kind))
            current = []
            continue
        current.append(token)
    items.append((current, ""))
    return items


def _group_members(tokens: list[Token]) -> list[_Mailbox]:
    """What stands between a group's colon and its closing semicolon."""
    if all(_is_cfws(t) or t.kind == "," for t in tokens):
        return []  # an empty group, perhaps with obsolete commas
    items = _split(tokens, ",;")
    mailboxes: list[_Mailbox] = []
    if all(_strip_cfws(item)[0] < len(item) for item, _ in items):  # mailbox (("," | ";") mailbox)*
        return [_mailbox(item) for item, _ in items]
    if any(separator == ";" for _, separator in items):
        raise _Unparsable
    seen = False  # the obsolete list: empty items before and after the first mailbox, commas only
    for item, _ in items:
        if _strip_cfws(item)[0] == len(item):
            continue
        seen = True
        mailboxes.append(_mailbox(item))
    if not seen:
        raise _Unparsable
    return mailboxes


def _addresses(tokens: list[Token]) -> list[_Mailbox]:
    found: list[_Mailbox] = []
    position, end = 0, len(tokens)
    while position < end:
        while position < end and tokens[position].kind == "ws":
            position += 1
        if position == end:
            break
        if tokens[position].kind in ",;":
            position += 1
            continue
        stop = position  # the address ends at the first separator, outside angle brackets
        inside = False
        while stop < end:
            kind = tokens[stop].kind
            if kind == "<":
                inside = True
            elif kind == ">":
                inside = False
            elif not inside and kind in ",;:":
                break
            stop += 1
        if stop < end and tokens[stop].kind == ":":  # a group: its display name, a colon, its members, ";"
            if not _is_phrase(tokens[position:stop], open_end=False):
                raise _Unparsable
            close = _group_end(tokens, stop + 1)
            found.extend(_group_members(tokens[stop + 1 : close]))
            position = close + 1
            while position < end and _is_cfws(tokens[position]):
                position += 1
        else:
            item = tokens[position:stop]
            last = len(item)
            while last and item[last - 1].kind == "ws":
                last -= 1
            mailbox = _mailbox(item[:last])
            found.append(_dotted_run(item) or mailbox)
            position = stop
        if position < end and tokens[position].kind not in ",;":
            raise _Unparsable
    return found


def _dotted_run(tokens: list[Token]) -> _Mailbox | None:
    """The gem's reading of a mailbox that starts with words and dots ending in a dot, followed by two or more
    spaces (``Q.  <a@x>``, ``a.  @x``): only that run is kept, as an address without domain."""
    first = 0
    while first < len(tokens) and _is_cfws(tokens[first]):
        first += 1
    end = first
    while end < len(tokens) and tokens[end].kind in ("atom", "quoted", "."):
        end += 1
    run = tokens[first:end]
    if not run or run[-1].kind != "." or not any(_is_word(t) for t in run):
        return None
    if end < len(tokens) and tokens[end].kind == "ws" and len(tokens[end].text) >= 2:
        return _Mailbox(_text(run), None)
    return None


def _group_end(tokens: list[Token], position: int) -> int:
    """The semicolon that closes a group: the first one after which only a separator or the end can follow (the
    members are separated by semicolons too)."""
    inside = False
    for index in range(position, len(tokens)):
        kind = tokens[index].kind
        if kind == "<":
            inside = True
        elif kind == ">":
            inside = False
        elif kind == ";" and not inside:
            after = index + 1
            while after < len(tokens) and _is_cfws(tokens[after]):
                after += 1
            if after == len(tokens) or tokens[after].kind in ",;":
                return index
    raise _Unparsable


def parse_address_list(value: str) -> list[str | None] | None:
    """The addresses of an address header (``mail.to``), or None where the gem cannot parse it (GitLab then
    sees the raw value). An address kept without a domain or local part may be None, as in the gem."""
    if not value.strip():
        return []
    try:
        return [mailbox.address() for mailbox in _addresses(_tokens(value))]
    except _Unparsable:
        return None


# --- message ids ---

_ID_LEFT = frozenset(("atom", "quoted", ".", ":", ",", "ws", "comment"))
_ID_RIGHT = _ID_LEFT | {"@", "literal"}


def parse_message_ids(value: str) -> list[str] | None:
    """The ids of a References (or In-Reply-To) header, brackets taken off, or None where the gem's parser
    refuses it. Ids are ``<left@right>`` tokens, separated by white space, comments or one comma, as well as
    the looser forms mail 2.8 takes (``<left>``, a bare ``left@right``)."""
    try:
        tokens = _tokens(value)
    except _Unparsable:
        return None
    ids: list[str] = []
    position, end = 0, len(tokens)
    comma_allowed = False
    while position < end:
        token = tokens[position]
        if _is_cfws(token):
            position += 1
            continue
        if token.kind == "," and comma_allowed:
            comma_allowed = False
            position += 1
            continue
        if token.kind == "<":
            close = next((i for i in range(position + 1, end) if tokens[i].kind in "<>"), end)
            if close < end and tokens[close].kind == ">":
                inner = tokens[position + 1 : close]
                if not inner or not _valid_id(inner):
                    return None
                ids.append(_text(inner))
                position = close + 1
            else:  # mail 2.8 also takes an id cut short with "...": it is kept with its "<"
                dots = next((i for i in range(position + 1, close - 2) if _is_ellipsis(tokens, i)), None)
                if dots is None or not _valid_id(tokens[position + 1 : dots]):
                    return None
                ids.append(_text(tokens[position : dots + 3]))
                position = dots + 3
        elif token.kind in ("atom", "quoted", "."):
            run = position  # a bare id: left[@right], no spaces
            while run < end and tokens[run].kind in ("atom", "quoted", ".", "@"):
                run += 1
            ids.append(_text(tokens[position:run]))
            position = run
        else:
            return None
        comma_allowed = True
    return ids if ids or not value.strip(RUBY_WHITESPACE) else None


def _is_ellipsis(tokens: list[Token], index: int) -> bool:
    return all(tokens[index + offset].kind == "." for offset in range(3))


def _valid_id(inner: list[Token]) -> bool:
    at = next((i for i, t in enumerate(inner) if t.kind == "@"), None)
    left = inner if at is None else inner[:at]
    if not left or any(t.kind not in _ID_LEFT for t in left):
        return False
    return at is None or all(t.kind in _ID_RIGHT for t in inner[at + 1 :])


# --- RFC 2047 encoded words ---

_WORD_HEAD = re.compile(r"=\?([^?]+)\?([QqBb])\?")


def decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded as the gem's Encodings.value_decode does: white space before an encoded word
    is dropped, a charset Python does not know leaves the word as it is. One pass: each ``=?`` is looked at once,
    and once no ``?=`` is left after a word's start, nothing further can be a word."""
    if "=?" not in value:
        return value
    out: list[str] = []
    position = search = 0
    while (start := value.find("=?", search)) >= 0:
        head = _WORD_HEAD.match(value, start)
        if head is None:
            search = start + 1
            continue
        close = value.find("?=", head.end())
        if close < 0:
            break
        between = value[position:start]
        if between.strip(" \t\r\n\f\v"):  # Ruby's blank?: nothing but white space
            out.append(between)
        out.append(_decode_word(head[1], head[2], value[head.end() : close], value[start : close + 2]))
        position = search = close + 2
    out.append(value[position:])
    return "".join(out)


def _decode_word(charset: str, kind: str, text: str, whole: str) -> str:
    charset = charset.split("*", 1)[0]  # RFC 2231 language suffix
    try:
        if kind in "Bb":
            data = base64.b64decode(text + "=" * (-len(text) % 4))
        else:
            data = binascii.a2b_qp(text.replace("_", " ").encode("latin-1", "replace"))
        codecs.lookup(charset)
    except (LookupError, ValueError, binascii.Error):
        return whole
    return data.decode(charset, "replace")
