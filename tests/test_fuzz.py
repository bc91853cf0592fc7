"""Property-based tests: no byte sequence can make the rules raise."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtp_gateway.headers import read_header
from lmtp_gateway.rules import route
from tests.conftest import finishes_within, routing_table

TABLE = routing_table(
    "gitlab.example.com",
    {"incoming_email": "incoming+%{key}@in.example.com", "service_desk_email": "desk+%{key}@in.example.com"},
)
NAMES = ["To", "Cc", "References", "Received", "Delivered-To", "Auto-Submitted", "X-Autoreply", "Envelope-To"]

header_lines = st.builds(
    lambda name, value, eol: name.encode() + b":" + value + eol,
    st.sampled_from(NAMES),
    st.binary(max_size=200),
    st.sampled_from([b"\r\n", b"\n", b"\r\n\t", b"\n "]),
)
messages = st.one_of(
    st.binary(max_size=2000),
    st.lists(header_lines, max_size=20).map(lambda lines: b"".join(lines) + b"\r\n\r\nbody"),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.one_of(st.none(), st.text(max_size=60)), st.sampled_from([None, "incoming_email"]))
def test_route_never_raises(raw: bytes, rcpt: str | None, mailbox: str | None) -> None:
    verdict = route(TABLE, raw, rcpt=rcpt, mailbox=mailbox)
    assert verdict.verdict in ("deliver", "drop", "reject")
    if verdict.verdict == "deliver":
        assert verdict.key and verdict.handler and verdict.mailbox and verdict.source


@given(st.binary(max_size=3000))
def test_headers_never_raise_and_have_clean_names(raw: bytes) -> None:
    for name, value in read_header(raw).fields:
        assert name and ":" not in name and "\n" not in name
        assert "\n" not in value


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="<>"), min_size=1))
def test_key_round_trips_through_the_template(key: str) -> None:
    template = TABLE.template("incoming_email")
    assert template is not None
    assert template.key_from(template.text.replace("%{key}", key, 1)) == key  # GitLab renders reply addresses so


HOSTILE_FRAGMENTS = ["a-1", "-1-", "for <<", "for <", "<", ">", "(", ")", '"', "\\", "=?x?q?", "?=", "incoming+", ", ",
                     ";", ":", "-issue", "-issue-1", "@", ".", "  ", "\t", "reply-", "<a@b>", "+", "/"]  # fmt: skip


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    st.sampled_from(["To", "Cc", "References", "Delivered-To", "Received", "X-Original-To", "Auto-Submitted"]),
    st.lists(st.sampled_from(HOSTILE_FRAGMENTS), min_size=1, max_size=4),
    st.integers(min_value=1_000, max_value=60_000),
    st.booleans(),
)
def test_hostile_headers_up_to_the_size_limits_are_routed_in_linear_time(
    name: str, fragments: list[str], repeat: int, with_rcpt: bool
) -> None:
    """Repeated fragments of the shapes that make naive parsers backtrack, up to about a megabyte of header."""
    value = "".join(fragments) * (repeat // len(fragments))
    raw = f"{name}: incoming+{value}@in.example.com\r\n".encode() + f"{name}: {value}\r\n\r\nbody".encode()
    rcpt = "incoming+59d8df8370b7e95c5a49fbf86aeb2c93@in.example.com" if with_rcpt else None
    verdict = finishes_within(30, route, TABLE, raw, rcpt=rcpt)
    assert verdict.verdict in ("deliver", "drop", "reject")
