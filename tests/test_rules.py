"""GitLab's routing rules (../shared/GITLAB_RULES.md), one rule or quirk per test."""

from __future__ import annotations

import time

import pytest

from lmtp_gateway.rules import (
    REASON_BLANK,
    REASON_NO_KEY,
    AddressTemplate,
    RoutingTable,
    TemplateError,
    classify_key,
    match_recipient,
    route,
)
from tests.conftest import message

REPLY_KEY = "59d8df8370b7e95c5a49fbf86aeb2c93"


# --- §1 address templates ---


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


def test_template_escapes_regex_characters() -> None:
    template = AddressTemplate.parse("in.coming+%{key}@ho.st")
    assert template.key_from("inXcoming+k@hoXst") is None
    assert template.key_from("in.coming+k@ho.st") == "k"


def test_only_the_first_placeholder_counts() -> None:
    template = AddressTemplate.parse("a+%{key}+%{key}@host")
    assert template.key_from("a+k+%{key}@host") == "k"
    assert template.key_from("a+k+j@host") is None


def test_catch_all_template() -> None:
    assert AddressTemplate.parse("incoming-%{key}@host").key_from("incoming-group-proj-1-tok-issue@host") == (
        "group-proj-1-tok-issue"
    )


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


def test_outgoing_addresses() -> None:
    template = AddressTemplate.parse("incoming+%{key}@host")
    assert template.address_for(REPLY_KEY) == f"incoming+{REPLY_KEY}@host"
    assert template.address_for(REPLY_KEY + "-unsubscribe") == f"incoming+{REPLY_KEY}-unsubscribe@host"


# --- §4 handlers ---


@pytest.mark.parametrize(
    ("key", "handler"),
    [
        (REPLY_KEY, "create_note"),
        ("rs-0000000000000000000000abc-rs", "create_note"),
        ("rs-0000000000000000000000abc", "create_note"),
        ("gitlab-org-gitlab-ce-20-Author_Token12345678-issue", "create_issue"),
        ("gitlab-org/gitlab-ce+Author_Token12345678", "create_issue"),
        ("gitlab-org-gitlab-ce-20-Author_Token12345678-issue-34", "create_note_on_issuable"),
        (REPLY_KEY + "+unsubscribe", "unsubscribe"),
        (REPLY_KEY + "-unsubscribe", "unsubscribe"),
        ("rs-0000000000000000000000abc-rs-unsubscribe", "unsubscribe"),
        ("gitlab-org-gitlab-ce-20-Author_Token12345678-merge-request", "create_merge_request"),
        ("gitlabhq/gitlabhq+merge-request+auth_token", "create_merge_request"),
        ("gitlabhq/gitlabhq+merge-request+auth+token", "create_merge_request"),  # prefix match only
        ("gitlab-org-gitlab-ce-20-issue-", "service_desk"),
        ("gitlab-org/gitlab-ce", "service_desk"),
        ("!!!not-a-key!!!", None),
        ("gitlab-org/gitlab-ce+Author_Token+extra", None),
        ("59D8DF8370B7E95C5A49FBF86AEB2C93", None),  # hex keys are lower-case
        ("group/sub-1-tok-issue", "service_desk"),  # with a slash: not a new issue, but legacy Service Desk
        ("gitlab-org-gitlab-ce-٢٠-tok-issue", None),  # \d is ASCII-only, as in Ruby
        ("abcd-0000000000000000000000ab", None),  # 24 base36 chars: one too few
    ],
)
def test_handler_classification(key: str, handler: str | None) -> None:
    assert classify_key(key) == handler


def test_service_desk_mailbox_takes_any_key() -> None:
    assert classify_key("project_slug-project_key", "service_desk_email") == "service_desk"
    assert classify_key(REPLY_KEY, "service_desk_email") == "service_desk"
    assert classify_key("project_slug-project_key", "incoming_email") is None


# --- §2 candidate order ---


def test_to_is_parsed_and_display_names_are_dropped(table: RoutingTable) -> None:
    raw = message(f'To: "Someone" <incoming+{REPLY_KEY}@incoming.example.com>')
    verdict = route(table, raw)
    assert (verdict.verdict, verdict.key, verdict.source, verdict.handler) == (
        "deliver",
        REPLY_KEY,
        "to",
        "create_note",
    )


def test_to_addresses_in_header_order(table: RoutingTable) -> None:
    raw = message(
        "To: a@example.com, incoming+gitlab-org/gitlab-ce@incoming.example.com, "
        f"incoming+{REPLY_KEY}@incoming.example.com"
    )
    assert route(table, raw).key == "gitlab-org/gitlab-ce"


def test_references_beats_delivered_to(table: RoutingTable) -> None:
    raw = message(
        "To: somebody@example.com",
        "Delivered-To: incoming+gitlab-org/gitlab-ce@incoming.example.com",
        f"References: <abc@example.com> <reply-{REPLY_KEY}@gitlab.example.com>",
    )
    verdict = route(table, raw)
    assert (verdict.source, verdict.key, verdict.mailbox) == ("references", REPLY_KEY, "incoming_email")


def test_references_comma_joined_and_single_id(table: RoutingTable) -> None:
    comma = message(f"References: <a@b>,<reply-{REPLY_KEY}@gitlab.example.com>")
    single = message(f"References: <reply-{REPLY_KEY}@gitlab.example.com>")
    assert route(table, comma).key == REPLY_KEY
    assert route(table, single).key == REPLY_KEY  # GitLab's parser misses this one; we find it on purpose


def test_references_host_must_be_gitlab_host_exactly(table: RoutingTable) -> None:
    raw = message(f"References: <reply-{REPLY_KEY}@gitlab.example.com.evil>")
    assert route(table, raw).verdict == "reject"


def test_in_reply_to_is_never_used(table: RoutingTable) -> None:
    raw = message(f"In-Reply-To: <reply-{REPLY_KEY}@gitlab.example.com>")
    assert route(table, raw).verdict == "reject"


def test_references_key_always_belongs_to_incoming_email() -> None:
    only_desk = RoutingTable.build("gitlab.example.com", {"service_desk_email": "desk+%{key}@host"})
    raw = message(f"References: <reply-{REPLY_KEY}@gitlab.example.com>")
    assert route(only_desk, raw).verdict == "reject"


def test_raw_headers_are_not_address_parsed(table: RoutingTable) -> None:
    named = message("Delivered-To: Name <incoming+gitlab-org/gitlab-ce@incoming.example.com>")
    bracketed = message("Delivered-To: <incoming+gitlab-org/gitlab-ce@incoming.example.com>")
    assert route(table, named).verdict == "reject"
    assert route(table, bracketed).verdict == "deliver"


@pytest.mark.parametrize(
    ("header", "source"),
    [
        ("Delivered-To", "delivered_to"),
        ("X-Delivered-To", "x_delivered_to"),
        ("Envelope-To", "envelope_to"),
        ("X-Envelope-To", "x_envelope_to"),
        ("X-Original-To", "x_original_to"),
        ("X-Forwarded-To", "x_forwarded_to"),
    ],
)
def test_each_raw_header_is_a_source(table: RoutingTable, header: str, source: str) -> None:
    raw = message(f"{header.upper()}:   incoming+{REPLY_KEY}@incoming.example.com  ")
    verdict = route(table, raw)
    assert (verdict.source, verdict.key) == (source, REPLY_KEY)


def test_raw_header_order_and_every_occurrence(table: RoutingTable) -> None:
    raw = message(
        "X-Original-To: incoming+late/one@incoming.example.com",
        "Delivered-To: support@example.com",
        "Delivered-To: incoming+first/one@incoming.example.com",
        "Envelope-To: incoming+env/one@incoming.example.com",
    )
    verdict = route(table, raw)
    assert (verdict.key, verdict.source) == ("first/one", "delivered_to")


def test_received_first_for_per_header_and_folded(table: RoutingTable) -> None:
    raw = message(
        "Received: from a by b; no recipient here",
        "Received: from c\n\tby d\n\tfor <incoming+first/one@incoming.example.com>\n"
        "\tfor <incoming+second/one@incoming.example.com>; Mon, 1 Jan 2024",
    )
    verdict = route(table, raw)
    assert (verdict.key, verdict.source) == ("first/one", "received")


def test_received_scan_takes_only_first_for_even_if_useless(table: RoutingTable) -> None:
    raw = message(
        "Received: by x for <nobody@example.com> for <incoming+first/one@incoming.example.com>",
        "Cc: incoming+cc/one@incoming.example.com",
    )
    assert route(table, raw).key == "cc/one"


def test_cc_is_last(table: RoutingTable) -> None:
    raw = message("Cc: Carbon <incoming+gitlab-org/gitlab-ce@incoming.example.com>", "To: x@y")
    verdict = route(table, raw)
    assert (verdict.source, verdict.handler) == ("cc", "service_desk")


def test_first_key_decides_even_without_handler(table: RoutingTable) -> None:
    raw = message(
        "To: incoming+!!!not-a-key!!!@incoming.example.com",
        f"Cc: incoming+{REPLY_KEY}@incoming.example.com",
    )
    verdict = route(table, raw)
    assert (verdict.verdict, verdict.key, verdict.reason) == ("reject", "!!!not-a-key!!!", REASON_NO_KEY)


def test_both_mailboxes_first_candidate_decides(table: RoutingTable) -> None:
    raw = message(
        "To: contact+project_slug-project_key@incoming.example.com",
        f"Cc: incoming+{REPLY_KEY}@incoming.example.com",
    )
    verdict = route(table, raw)
    assert (verdict.mailbox, verdict.handler, verdict.key) == (
        "service_desk_email",
        "service_desk",
        "project_slug-project_key",
    )


def test_incoming_template_is_tried_before_service_desk() -> None:
    overlapping = RoutingTable.build("h", {"incoming_email": "in+%{key}@host", "service_desk_email": "in+%{key}@host"})
    assert route(overlapping, message(f"To: in+{REPLY_KEY}@host")).mailbox == "incoming_email"


def test_mailbox_restriction_routes_as_that_mailbox_only(table: RoutingTable) -> None:
    raw = message(
        f"To: incoming+{REPLY_KEY}@incoming.example.com",
        "Cc: contact+project_slug-project_key@incoming.example.com",
    )
    assert route(table, raw, mailbox="incoming_email").source == "to"
    desk = route(table, raw, mailbox="service_desk_email")
    assert (desk.source, desk.mailbox, desk.key) == ("cc", "service_desk_email", "project_slug-project_key")


def test_no_key_anywhere_is_rejected_with_gitlabs_reason(table: RoutingTable) -> None:
    verdict = route(table, message("To: someone@example.com", "Subject: hi"))
    assert (verdict.verdict, verdict.reason) == ("reject", REASON_NO_KEY)
    assert [p.source for p in verdict.probes] == ["to"]


# --- envelope recipient ---


def test_envelope_is_checked_first(table: RoutingTable) -> None:
    raw = message(f"To: incoming+{REPLY_KEY}@incoming.example.com")
    verdict = route(table, raw, rcpt="incoming+gitlab-org/gitlab-ce@incoming.example.com")
    assert (verdict.source, verdict.key, verdict.handler) == (
        "envelope",
        "gitlab-org/gitlab-ce",
        "service_desk",
    )


def test_envelope_matching_nothing_is_rejected(table: RoutingTable) -> None:
    verdict = route(table, message(f"To: incoming+{REPLY_KEY}@incoming.example.com"), rcpt="who@example.com")
    assert verdict.verdict == "reject"
    assert verdict.reason == "envelope recipient <who@example.com>: no GitLab mailbox has this address"


def test_dedicated_address_finds_key_in_references_only() -> None:
    dedicated = RoutingTable.build("localhost", {"incoming_email": "reply@appmail.example.com"})
    with_refs = message("To: reply@appmail.example.com", f"References: <reply-{REPLY_KEY}@localhost>")
    without = message("To: reply@appmail.example.com")
    found = route(dedicated, with_refs, rcpt="reply@appmail.example.com")
    assert (found.verdict, found.source, found.key) == ("deliver", "references", REPLY_KEY)
    missing = route(dedicated, without, rcpt="reply@appmail.example.com")
    assert (missing.verdict, missing.reason) == ("reject", REASON_NO_KEY)


def test_dedicated_envelope_restricts_to_its_mailbox() -> None:
    both = RoutingTable.build("localhost", {"incoming_email": "reply@host", "service_desk_email": "desk+%{key}@host"})
    raw = message("To: desk+slug-key@host", f"References: <reply-{REPLY_KEY}@localhost>")
    verdict = route(both, raw, rcpt="reply@host")
    assert (verdict.mailbox, verdict.source) == ("incoming_email", "references")


def test_match_recipient_for_rcpt_time_answers(table: RoutingTable) -> None:
    assert match_recipient(table, f"incoming+{REPLY_KEY}@incoming.example.com").handler == "create_note"
    assert match_recipient(table, "contact+anything@incoming.example.com").accepted
    assert not match_recipient(table, "incoming+!!!@incoming.example.com").accepted
    assert not match_recipient(table, "postmaster@incoming.example.com").accepted
    assert match_recipient(RoutingTable.build("h", {"incoming_email": "reply@host"}), "reply@host").accepted


# --- §3 auto-generated and blank ---


@pytest.mark.parametrize(
    ("header", "dropped"),
    [
        ("Auto-Submitted: auto-replied", True),
        ("Auto-Submitted: auto-generated", True),
        ("Auto-Submitted: No", True),  # case-sensitive: only "no" is human
        ("Auto-Submitted:   no  ", False),
        ("X-Autoreply: yes", True),
        ("X-Autoreply: Yes", False),
        ("Precedence: bulk", False),
        ("X-Auto-Response-Suppress: All", False),
    ],
)
def test_auto_generated(table: RoutingTable, header: str, dropped: bool) -> None:
    raw = message(f"To: incoming+{REPLY_KEY}@incoming.example.com", header)
    assert route(table, raw).verdict == ("drop" if dropped else "deliver")


def test_auto_generated_is_checked_before_the_key(table: RoutingTable) -> None:
    assert route(table, message("To: nobody@example.com", "Auto-Submitted: auto-replied")).verdict == "drop"


@pytest.mark.parametrize("raw", [b"", b"\r\n", b"   \n\n  "])
def test_blank_message(table: RoutingTable, raw: bytes) -> None:
    assert route(table, raw).reason == REASON_BLANK


# --- robustness ---


def test_crlf_and_lf_give_the_same_verdict(table: RoutingTable) -> None:
    headers = (f"To: incoming+{REPLY_KEY}@incoming.example.com", "Subject: x")
    assert route(table, message(*headers, crlf=True)) == route(table, message(*headers))


def test_body_is_never_read_as_headers(table: RoutingTable) -> None:
    raw = message("Subject: x", body=f"To: incoming+{REPLY_KEY}@incoming.example.com\n")
    assert route(table, raw).verdict == "reject"


def test_undecodable_header_bytes(table: RoutingTable) -> None:
    raw = b"Subject: \xff\xfe\x00\r\nTo: incoming+" + REPLY_KEY.encode() + b"@incoming.example.com\r\n\r\nx"
    assert route(table, raw).key == REPLY_KEY


def test_received_scan_is_linear(table: RoutingTable) -> None:
    # GitLab's own regression test: it must answer well within 2 s; linear scanning takes milliseconds.
    raw = b"Received: " + b"for <<" * 100_000 + b"\r\n\r\nbody"
    started = time.perf_counter()
    verdict = route(table, raw)
    assert time.perf_counter() - started < 1.0
    assert verdict.verdict == "reject"


def test_enormous_header_block(table: RoutingTable) -> None:
    raw = b"X-Junk: " + b"a" * 5_000_000 + b"\n" + b"Cc: x@y\n" * 50_000 + b"\nbody"
    started = time.perf_counter()
    assert route(table, raw).verdict == "reject"
    assert time.perf_counter() - started < 5.0
