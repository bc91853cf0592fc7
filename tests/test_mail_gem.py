"""The gateway's reading of a header against Ruby's mail gem reading the same bytes (Debian's ruby-mail).

GitLab reads mail with the gem, so this is the test that keeps the two from drifting apart: generated messages
(addresses in every RFC 5322 form, obsolete ones included, comments, groups, quoted strings, folding, repeated
and misplaced fields, stray line ends, white space the gem keeps) go through both readers, and To, Cc,
References and the raw fields GitLab looks at must come out the same.

Debian ships mail 2.7; GitLab pins 2.8. Where the two differ (docs/gitlab-rules.md §3), the gateway follows 2.8
and these comparisons leave the difference out:

* a repeated To, Cc or References: 2.7 keeps the last occurrence even when it does not parse, 2.8 the last that
  parses; the selection is checked by the fixtures, and here the gem's answer is compared with the reading of
  the last occurrence alone;
* References: 2.8 also takes ids separated by commas, bare ``left@right`` ids and ``<left>``, which 2.7 returns
  as raw text; the generated References hold well-formed ids only;
* an empty References is [] in 2.8 and nil in 2.7.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtp_gateway.headers import Header, read_header
from lmtp_gateway.rules import received_for
from tests.conftest import REPO, under_ci

PROBE = REPO / "tests" / "mail_gem" / "read_header.rb"
RAW_FIELDS = ("Delivered-To", "X-Delivered-To", "Envelope-To", "X-Envelope-To", "Received", "X-Original-To",
              "X-Forwarded-To", "Auto-Submitted", "X-Autoreply")  # fmt: skip


class MailGem:
    """One Ruby process reading messages for the whole session."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            ["ruby", str(PROBE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def read(self, raw: bytes) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"raw": base64.b64encode(raw).decode()}) + "\n")
        line = self.process.stdout.readline()
        assert line, "the mail gem probe ended"
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(10)


@pytest.fixture(scope="module")
def gem() -> Iterator[MailGem]:
    ruby = shutil.which("ruby")
    found = ruby and subprocess.run(["ruby", "-e", "require 'mail'"], capture_output=True).returncode == 0
    if not found:
        message = "Ruby's mail gem is not installed: apt-get install ruby-mail"
        if under_ci():
            pytest.fail(message)
        pytest.skip(message)
    reader = MailGem()
    try:
        yield reader
    finally:
        reader.close()


# --- what messages are made of ---

atoms = st.text(alphabet="abcxyz019+-_./=!#$%&'*?^`{|}~", min_size=1, max_size=8)
utf8_atoms = st.sampled_from(["jörg", "ü", "日本", "é-x"])
locals_ = st.one_of(
    atoms,
    st.builds(lambda a, b: f"{a}.{b}", atoms, atoms),
    st.sampled_from(['"a b"', '"a\\"b"', '"x@y"', '""', '"q"', '"in+k"']),
    utf8_atoms,
    st.sampled_from([f"incoming+{'59d8df8370b7e95c5a49fbf86aeb2c93'}", "incoming+group/x+Tok", ".a", "a.", "a..b"]),
)
domains = st.one_of(
    st.sampled_from(["incoming.example.com", "example.org", "x", "[192.0.2.1]", "a-b.c", "x.", ".x", "mö.de"]),
    st.builds(lambda a, b: f"{a}.{b}", atoms, atoms),
)
comments = st.sampled_from(["(c)", "(a (nested) b)", "(quoted \\) paren)", "()", "(ü)"])
spaces = st.sampled_from(["", " ", "  ", "\t"])
display_names = st.one_of(
    st.sampled_from(["Alice", "Alice B", '"B, C"', '"Ö"', "=?utf-8?q?J=C3=B6rg?=", "a.b", "@", "GitLab (bot)", '"q"x']),
    atoms,
)


@st.composite
def mailboxes(draw: Any) -> str:
    # (not two spaces before the @ after a trailing dot: "a.  @x" loses its domain in the gem, "a. @x" does not)
    address = f"{draw(locals_)}{draw(st.sampled_from(['', ' ']))}@{draw(spaces)}{draw(domains)}"
    form = draw(st.sampled_from(["bare", "angle", "named", "route", "no-at", "comment"]))
    if form == "angle":
        return f"<{address}>"
    if form == "named":
        return f"{draw(display_names)}{draw(spaces)}<{address}>"
    if form == "route":
        return f"<@{draw(domains)},@{draw(domains)}:{address}>"
    if form == "no-at":
        return draw(st.sampled_from(["<local>", "Name <local>", "local", "x.y"]))
    if form == "comment":
        return f"{address} {draw(comments)}"
    return address


@st.composite
def address_lists(draw: Any) -> str:
    items = draw(st.lists(st.one_of(mailboxes(), st.just("")), min_size=1, max_size=4))
    if draw(st.booleans()):
        name = draw(st.sampled_from(["team", "undisclosed-recipients", '"A group"']))
        members = ", ".join(draw(st.lists(mailboxes(), max_size=3)))
        items.insert(draw(st.integers(0, len(items))), f"{name}:{members};")
    separators = [draw(st.sampled_from([", ", ",", "; ", " ,"])) for _ in items]
    text = "".join(item + separator for item, separator in zip(items, separators, strict=True))[: -len(separators[-1])]
    broken = draw(st.sampled_from(["", "", "", " <", "<", ' "', " (", ">", "@", " x y"]))
    return text + broken


id_parts = st.text(alphabet="abcxyz019+-_=!#$%&'*?^`{|}~", min_size=1, max_size=8)  # ids both versions take alike
message_ids = st.builds(lambda a, b, c: f"<{a}@{b}.{c}>", id_parts, id_parts, id_parts) | st.just(
    "<reply-59d8df8370b7e95c5a49fbf86aeb2c93@gitlab.example.com>"
)
references = st.builds(
    lambda ids, separator: separator.join(ids), st.lists(message_ids, min_size=1, max_size=4), spaces.filter(bool)
)
raw_values = st.one_of(
    mailboxes(), st.sampled_from(["", "no", "yes", "no\u00a0", " no ", "auto-replied", "No"]), atoms
)
received = st.builds(
    lambda a, b: f"from mx by gw {a} for <{b}>; Sun, 22 Nov 2026 09:12:44 +0000",
    st.sampled_from(["", "with ESMTP", "for x"]),
    st.one_of(atoms, st.just("incoming+k@incoming.example.com"), st.just("<<")),
)


@st.composite
def header_lines(draw: Any) -> str:
    kind = draw(st.sampled_from(["to", "cc", "references", "raw", "received", "junk", "subject"]))
    if kind in ("to", "cc"):
        name, value = draw(st.sampled_from([kind.capitalize(), kind.upper(), f"{kind.capitalize()} "])), draw(
            address_lists()
        )
    elif kind == "references":
        name, value = "References", draw(references)
    elif kind == "raw":
        name, value = draw(st.sampled_from((*RAW_FIELDS[:-1], "x-autoreply"))), draw(raw_values)
    elif kind == "received":
        name, value = "Received", draw(received)
    elif kind == "junk":
        return draw(st.sampled_from(["not a field", "Bad Name: x", ": empty name", "Subject: x\r\n  continued"]))
    else:
        name, value = "Subject", draw(st.text(max_size=20).map(lambda t: t.replace("\r", "").replace("\n", "")))
    if draw(st.booleans()) and " " in value.strip():
        head, _, tail = value.strip().partition(" ")
        fold = draw(st.sampled_from(["\r\n ", "\r\n\t", "\r\n  "]))
        value = f"{head}{fold}{tail}"
    return f"{name}:{draw(spaces)}{value}{draw(spaces)}"


@st.composite
def messages(draw: Any) -> bytes:
    lines = draw(st.lists(header_lines(), min_size=1, max_size=8))
    line_end = draw(st.sampled_from(["\r\n", "\n"]))
    lead = draw(st.sampled_from(["", "", "\r\n", "  ", "\n \n"]))
    text = lead + line_end.join(lines) + line_end + line_end + "body\r\n"
    return text.encode("utf-8")


# --- the comparison ---


def last_reading(header: Header, name: str, read: Any) -> Any:
    """The reading of the last occurrence of a field alone: what mail 2.7 answers for a repeated one."""
    values = header.values(name)
    if not values:
        return None
    index = max(i for i, (field, _) in enumerate(header.fields) if field.lower() == name.lower())
    alone = Header(header.fields[index : index + 1], header.lines[index : index + 1], header.folded[index : index + 1])
    return read(alone)


def ours(raw: bytes) -> dict[str, Any]:
    header = read_header(raw)

    return {
        "to": last_reading(header, "To", lambda alone: alone.addresses("To")),
        "cc": last_reading(header, "Cc", lambda alone: alone.addresses("Cc")),
        "references": last_reading(header, "References", lambda alone: alone.message_ids("References")),
        "fields": {name: header.values(name) for name in RAW_FIELDS if name != "Received"},
        "received": list(received_for(header.values("Received"))),
    }


def routable(addresses: Any) -> Any:
    """What a template can match. An address without a domain, with nothing before its @, or with an address
    literal for a domain never matches one (a template has text or the key before its @, and a domain name); for
    those the gem gives nil, "", the local part, or the domain of an earlier address, depending on the addresses
    before it, and they all read "(unroutable)" here."""
    if not isinstance(addresses, list):
        return addresses
    return [
        address
        if address and "@" in address and not (address.startswith("@") and ":" not in address) and "@[" not in address
        else "(unroutable)"
        for address in addresses
    ]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(messages())
def test_the_gateway_reads_headers_as_the_mail_gem(gem: MailGem, raw: bytes) -> None:
    theirs = gem.read(raw)
    assert "error" not in theirs, theirs
    theirs["received"] = list(received_for(theirs["fields"].pop("Received")))  # what GitLab takes from them
    mine = ours(raw)
    for field in ("to", "cc", "references", "fields", "received"):
        if field in ("to", "cc"):
            assert routable(mine[field]) == routable(theirs[field]), (field, raw)
        else:
            assert mine[field] == theirs[field], (field, raw)


def test_the_probe_is_the_gem_and_reads_what_routing_needs(gem: MailGem) -> None:
    """The comparison above is only worth something if the probe answers: a known message, known answers."""
    answer = gem.read(b'To: "GitLab" <incoming+k@h>, <bad\r\nDelivered-To: a\r\nDelivered-To: b\r\n\r\nbody')
    assert answer["version"].startswith("2.")
    assert answer["to"] == '"GitLab" <incoming+k@h>, <bad'
    assert answer["fields"]["Delivered-To"] == ["a", "b"]
