"""GitLab's routing rules (docs/gitlab-rules.md) piece by piece; tests/fixtures/gitlab holds a whole message for
each rule (test_conformance.py). Here: templates, the handler formats, recipients at RCPT, and that no input can
make a rule take more than linear time."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtp_gateway.errors import TemplateError
from lmtp_gateway.rules import (
    REASON_BLANK,
    AddressTemplate,
    RoutingTable,
    classify_key,
    match_recipient,
    route,
    scanned_ids,
)
from tests.conftest import finishes_within, message, routing_table

REPLY_KEY = "59d8df8370b7e95c5a49fbf86aeb2c93"


# --- §2 address templates ---


def test_template_key_is_greedy_and_keeps_plus_signs() -> None:
    template = AddressTemplate.parse("incoming+%{key}@host")
    assert template.key_from("incoming+a+b@host") == "a+b"
    assert template.key_from("<incoming+a+b@host>") == "a+b"


def test_template_matching_is_case_sensitive_and_whole_string() -> None:
    template = AddressTemplate.parse("incoming+%{key}@host")
    assert template.key_from("Incoming+abc@host") is None
    assert template.key_from("incoming+abc@HOST") is None
    assert template.key_from("xincoming+abc@host") is None
    assert template.key_from("incoming+abc@host.evil") is None
    assert template.key_from("incoming+@host") is None  # the key must not be empty
    assert template.key_from("incoming+a\nb@host") is None  # Ruby's "." stops at a line break


def test_template_escapes_regex_characters() -> None:
    template = AddressTemplate.parse("in.coming+%{key}@ho.st")
    assert template.key_from("inXcoming+k@hoXst") is None
    assert template.key_from("in.coming+k@ho.st") == "k"


def test_only_the_first_placeholder_counts() -> None:
    template = AddressTemplate.parse("a+%{key}+%{key}@host")
    assert template.key_from("a+k+%{key}@host") == "k"
    assert template.key_from("a+k+j@host") is None


def test_dedicated_address_never_yields_a_key() -> None:
    template = AddressTemplate.parse("reply@host")
    assert not template.has_key
    assert template.key_from("reply@host") is None
    assert template.match("<reply@host>")


@pytest.mark.parametrize(
    "text", ["incoming@%{key}.example.com", "no-at-sign", "@host", "user@", "incoming@host+%{key}"]
)
def test_bad_templates_are_refused(text: str) -> None:
    with pytest.raises(TemplateError):
        AddressTemplate.parse(text)


def test_references_host_goes_into_the_regex_as_it_is() -> None:
    table = routing_table("gitlab.example.com", {"incoming_email": "reply@host"})
    assert table.reply_id.fullmatch(f"reply-{REPLY_KEY}@gitlabXexample.com")  # GitLab does not escape the host
    assert not table.reply_id.fullmatch(f"reply-{REPLY_KEY}@gitlab.example.com.evil")


# --- §6 handlers ---


@pytest.mark.parametrize(
    ("key", "handler"),
    [
        (REPLY_KEY, "create_note"),
        ("rs-0000000000000000000000abc-rs", "create_note"),
        ("rs-0000000000000000000000abc", "create_note"),
        ("gitlab-org-gitlab-ce-20-Author_Token12345678-issue", "create_issue"),
        ("gitlab-org/gitlab-ce+Author_Token12345678", "create_issue"),
        ("gitlab-org/gitlab-ce+", "create_issue"),  # an empty token is still a token in Ruby
        ("gitlab-org-gitlab-ce-20-Author_Token12345678-issue-34", "create_note_on_issuable"),
        ("a-1-t-issue-5-issue-6", "create_note_on_issuable"),
        (REPLY_KEY + "+unsubscribe", "unsubscribe"),
        (REPLY_KEY + "-unsubscribe", "unsubscribe"),
        ("rs-0000000000000000000000abc-rs-unsubscribe", "unsubscribe"),
        ("gitlab-org-gitlab-ce-20-Author_Token12345678-merge-request", "create_merge_request"),
        ("gitlabhq/gitlabhq+merge-request+auth_token", "create_merge_request"),
        ("gitlabhq/gitlabhq+merge-request+auth+token", "create_merge_request"),  # a prefix match only
        ("gitlab-org-gitlab-ce-20-issue-", "service_desk"),
        ("gitlab-org/gitlab-ce", "service_desk"),
        ("!!!not-a-key!!!", None),
        ("gitlab-org/gitlab-ce+Author_Token+extra", None),
        ("59D8DF8370B7E95C5A49FBF86AEB2C93", None),  # hex keys are lower-case
        ("group/sub-1-tok-issue", "service_desk"),  # with a slash: not a new issue, but a legacy Service Desk path
        ("gitlab-org-gitlab-ce-٢٠-tok-issue", None),  # \d is ASCII-only, as in Ruby
        ("abcd-0000000000000000000000ab", None),  # 24 base36 characters: one too few
        ("-1-t-issue", None),  # the slug must not be empty
        ("s-1--issue", None),  # nor the token
        ("s-1-t\n-issue", None),  # Ruby's "." stops at a line break
    ],
)
def test_handler_classification(key: str, handler: str | None) -> None:
    assert classify_key(key) == handler


def test_service_desk_mailbox_takes_any_key() -> None:
    assert classify_key("project_slug-project_key", "service_desk_email") == "service_desk"
    assert classify_key(REPLY_KEY, "service_desk_email") == "service_desk"
    assert classify_key("project_slug-project_key", "incoming_email") is None


def test_service_desk_needs_incoming_email_with_a_key_address() -> None:
    assert classify_key("gitlab-org/gitlab", service_desk=False) is None
    assert classify_key("gitlab-org-gitlab-20-issue-", service_desk=False) is None
    dedicated = routing_table("h", {"incoming_email": "reply@host", "service_desk_email": "desk+%{key}@host"})
    assert not dedicated.service_desk
    refused = match_recipient(dedicated, "desk+project-key@host")
    assert not refused.accepted and "Service Desk needs" in refused.reason


# GitLab's own formats as written in its handlers (Ruby's regexes, with Python's fullmatch for \A…\z). They
# backtrack, so they are only run here, on short keys, to show the linear checks accept exactly the same keys.
_BASE = r"(?P<slug>.+)-(?P<project_id>\d+)"
GITLAB_FORMATS = {
    "create_issue": re.compile(rf"{_BASE}-(?P<token>.+)-issue", re.ASCII),
    "create_note_on_issuable": re.compile(rf"{_BASE}-(?P<token>.+)-issue-(?P<iid>\d+)", re.ASCII),
    "create_merge_request": re.compile(rf"{_BASE}-(?P<token>.+)-merge-request", re.ASCII),
    "service_desk": re.compile(rf"{_BASE}-issue-", re.ASCII),
}
keys = st.text(alphabet="ab1-/+\nisueqrgmt", max_size=24) | st.builds(
    lambda a, b, c, suffix: f"{a}-{b}-{c}{suffix}",
    st.text(alphabet="a-1\n", min_size=0, max_size=5),
    st.text(alphabet="12a", min_size=0, max_size=3),
    st.text(alphabet="a-1", min_size=0, max_size=5),
    st.sampled_from(["-issue", "-issue-", "-issue-3", "-merge-request", ""]),
)


@settings(max_examples=1500)
@given(keys)
def test_linear_handler_checks_accept_what_gitlabs_regexes_accept(key: str) -> None:
    from lmtp_gateway import rules

    linear = {
        "create_issue": "/" not in key and key.endswith("-issue") and rules._slug_id_token(key[: -len("-issue")]),
        "create_note_on_issuable": rules._is_create_note_on_issuable(key),
        "create_merge_request": "/" not in key
        and key.endswith("-merge-request")
        and rules._slug_id_token(key[: -len("-merge-request")]),
        "service_desk": "/" not in key and rules._is_service_desk(key),
    }
    for handler, pattern in GITLAB_FORMATS.items():
        expected = pattern.fullmatch(key) is not None and (handler == "create_note_on_issuable" or "/" not in key)
        assert linear[handler] == expected, (handler, key)


@settings(max_examples=1000)
@given(st.text(alphabet="<>ab \n", max_size=30))
def test_references_scan_finds_what_gitlabs_scan_finds(text: str) -> None:
    assert scanned_ids(text) == re.findall(r"(?!<)[^<>]+(?=>)", text)


# --- recipients at RCPT ---


def test_match_recipient_for_rcpt_time_answers(table: RoutingTable) -> None:
    assert match_recipient(table, f"incoming+{REPLY_KEY}@incoming.example.com").handler == "create_note"
    assert match_recipient(table, "contact+anything@incoming.example.com").accepted
    assert not match_recipient(table, "incoming+!!!@incoming.example.com").accepted
    assert not match_recipient(table, "postmaster@incoming.example.com").accepted
    assert match_recipient(routing_table("h", {"incoming_email": "reply@host"}), "reply@host").accepted


def test_envelope_matching_nothing_is_rejected(table: RoutingTable) -> None:
    verdict = route(table, message(f"To: incoming+{REPLY_KEY}@incoming.example.com"), rcpt="who@example.com")
    assert verdict.verdict == "reject"
    assert verdict.reason == "envelope recipient <who@example.com>: no GitLab mailbox has this address"


@pytest.mark.parametrize("raw", [b"", b"\r\n", b"   \n\n  "])
def test_blank_message(table: RoutingTable, raw: bytes) -> None:
    assert route(table, raw).reason == REASON_BLANK


def test_crlf_and_lf_give_the_same_verdict(table: RoutingTable) -> None:
    headers = (f"To: incoming+{REPLY_KEY}@incoming.example.com", "Subject: x")
    assert route(table, message(*headers, crlf=True)) == route(table, message(*headers))


def test_body_is_never_read_as_headers(table: RoutingTable) -> None:
    raw = message("Subject: x", body=f"To: incoming+{REPLY_KEY}@incoming.example.com\n")
    assert route(table, raw).verdict == "reject"


# --- linear time on hostile input (a guard against a hang, not a measure: linear takes well under a second) ---

HOSTILE_KEY = "a-1" * 40_000 + "-"  # the shape that made the one-regex handler formats quadratic


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"Received: " + b"for <<" * 100_000 + b"\r\n\r\nbody", id="gitlabs-own-received-test"),
        pytest.param(f"To: incoming+{HOSTILE_KEY}@incoming.example.com\r\n\r\nx".encode(), id="key-in-to"),
        pytest.param(f"References: <a@b> <reply-{HOSTILE_KEY}@gitlab.example.com>\r\n\r\nx".encode(), id="references"),
        pytest.param(b"References: " + b"a" * 1_000_000 + b"\r\n\r\nx", id="references-without-brackets"),
        pytest.param(b"To: " + b"(" * 200_000 + b"\r\n\r\nx", id="open-comments"),
        pytest.param(b"To: " + b"a@b (c)" * 100_000 + b"\r\n\r\nx", id="comments-after-addresses"),
        pytest.param(b"To: " + b"=?utf-8?q?" * 100_000 + b"\r\n\r\nx", id="encoded-word-starts"),
        pytest.param(b"Cc: " + b'"' + b"a" * 1_000_000 + b"\r\n\r\nx", id="open-quote"),
        pytest.param(b"X-Junk: " + b"a" * 1_000_000 + b"\r\n" + b"Cc: x@y\r\n" * 50_000 + b"\r\nx", id="many-lines"),
        pytest.param(b"Delivered-To: incoming+" + b"+" * 1_000_000 + b"@incoming.example.com\r\n\r\nx", id="plus"),
    ],
)
def test_every_rule_is_linear(table: RoutingTable, raw: bytes) -> None:
    finishes_within(30, route, table, raw)
    finishes_within(30, route, table, raw, rcpt=f"incoming+{REPLY_KEY}@incoming.example.com")


@pytest.mark.parametrize("key", [HOSTILE_KEY, HOSTILE_KEY + "issue", "x-" + "1-" * 200_000 + "issue-", "+" * 500_000])
def test_handler_checks_are_linear(key: str) -> None:
    finishes_within(30, classify_key, key)
