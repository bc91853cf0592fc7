"""GitLab's verdict on every rule of docs/gitlab-rules.md (tests/fixtures/gitlab/cases.yaml), three ways:
the rules in process, `lmtp-gateway explain --json` as an admin runs it, and a real gateway over LMTP, whose
replies, journal entries, log lines and metrics must all say the same."""

from __future__ import annotations

import concurrent.futures
import copy
import json
import logging
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmtp_gateway.config import Config, parse_config
from lmtp_gateway.journal import State
from lmtp_gateway.rules import route
from tests.conftest import REPO, StartGateway, lmtp_gateway_command

FIXTURES = REPO / "tests" / "fixtures" / "gitlab"
_FILLER = re.compile(r"\{filler:(\d+)\}")


def load_cases() -> list[dict[str, Any]]:
    data = yaml.safe_load((FIXTURES / "cases.yaml").read_text(encoding="utf-8"))
    cases = []
    for case in data["cases"]:
        sections = copy.deepcopy(data["defaults"]["config"])
        for name, value in (case.get("config") or {}).items():
            if value is None:
                sections.pop(name, None)
            else:
                sections[name] = value
        for name in ("incoming_email", "service_desk_email"):
            if name in sections:
                sections[name] = {"delivery_method": "maildir", **sections[name]}
        cases.append({**case, "sections": sections, "raw": expand(case["message"])})
    return cases


def expand(message: str) -> bytes:
    """The message's bytes, "{filler:N}" written out as N header lines."""
    filler = _FILLER.sub(lambda m: "".join(f"X-Filler: {n}\r\n" for n in range(int(m[1]))), message)
    return filler.encode("utf-8")


def case_config(case: dict[str, Any], spool: Path | None = None) -> Config:
    sections = dict(case["sections"])
    if spool is not None:
        sections.update(
            spool={"path": str(spool)},
            lmtp={"listen": "127.0.0.1:0"},
            monitoring={"listen": "off", "collect_listen": "off"},
        )
    return parse_config(yaml.safe_dump(sections), f"{case['name']}.yml")


def check(case: dict[str, Any], verdict: dict[str, Any]) -> None:
    """`verdict` (explain's JSON object) says what the case expects; `note: true` asks for a note at all."""
    for field, wanted in case["expect"].items():
        if field == "note":
            assert bool(verdict.get("note")) == wanted, f"{case['name']}: note {verdict.get('note')!r}"
        else:
            assert verdict.get(field) == wanted, f"{case['name']}: {field} is {verdict.get(field)!r}; {verdict}"


CASES = load_cases()


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_rules(case: dict[str, Any]) -> None:
    verdict = route(case_config(case).routing, case["raw"], rcpt=case.get("rcpt"), mailbox=case.get("mailbox"))
    check(case, verdict.as_dict())


def test_explain_json_gives_each_verdict(tmp_path: Path) -> None:
    def run(case: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        config = tmp_path / f"{case['name']}.yml"
        config.write_text(yaml.safe_dump(case["sections"]))
        message = tmp_path / f"{case['name']}.eml"
        message.write_bytes(case["raw"])
        args = ["--config", str(config)]
        for option in ("rcpt", "mailbox"):
            if case.get(option):
                args += [f"--{option}", case[option]]
        done = subprocess.run(
            [*lmtp_gateway_command(), "explain", "--json", *args, str(message)], capture_output=True, timeout=120
        )
        assert done.returncode == 0, done.stderr.decode()
        return case, json.loads(done.stdout)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for case, verdict in pool.map(run, CASES):
            check(case, verdict)


LMTP_CASES = [case for case in CASES if case.get("rcpt")]
LMTP_REPLY = {"deliver": "250 2.0.0", "drop": "250 2.0.0", "reject": "550 5.1.1"}


async def test_lmtp_journal_log_and_metrics_agree(
    start_gateway: StartGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each copy over LMTP: the reply, the journal entry, its log line and the counters say what explain says."""
    caplog.set_level(logging.DEBUG, logger="lmtp_gateway.intake")  # a copy to deliver: its commit's debug line
    by_config: dict[str, list[dict[str, Any]]] = {}
    for case in LMTP_CASES:
        by_config.setdefault(json.dumps(case["sections"], sort_keys=True), []).append(case)
    for number, cases in enumerate(by_config.values()):
        spool = tmp_path / f"spool{number}"
        running = await start_gateway(case_config(cases[0], spool))
        client = await running.client()
        for case in cases:
            expected = route(case_config(case).routing, case["raw"], rcpt=case["rcpt"])
            caplog.clear()
            done = await client.send("sender@example.org", [case["rcpt"]], case["raw"])
            reply = done.results[0]
            assert reply.startswith(LMTP_REPLY[expected.verdict]), f"{case['name']}: {reply}"
            if expected.verdict == "reject":
                assert not any(r.__dict__.get("event") in ("accepted", "dropped") for r in caplog.records)
                continue
            entry_id = reply.split()[3]
            state = State.PENDING if expected.verdict == "deliver" else State.DROPPED
            committed = running.gateway.journal.find(entry_id)
            assert committed is not None, f"{case['name']}: no entry {entry_id}"
            recorded = {"mailbox": committed.mailbox, "key": committed.key, "handler": committed.handler,
                        "source": committed.source, "drop": committed.drop, "note": committed.note}  # fmt: skip
            assert recorded == {"mailbox": expected.mailbox, "key": expected.key, "handler": expected.handler,
                                "source": expected.source, "drop": expected.drop, "note": expected.note}  # fmt: skip
            assert committed.state in (state, State.DELIVERED)
            (line,) = [
                r
                for r in caplog.records
                if r.name == "lmtp_gateway.intake" and r.__dict__.get("journal_id") == entry_id
            ]
            assert (line.__dict__["verdict"], line.__dict__["key"]) == (expected.verdict, expected.key)
            assert line.__dict__.get("note") == expected.note
        await client.quit()
        metrics = running.gateway.metrics
        delivered = sum(1 for case in cases if route(case_config(case).routing, case["raw"], rcpt=case["rcpt"])
                        .verdict == "deliver")  # fmt: skip
        counted = sum(sample.value for sample in metrics.accepted.collect()[0].samples if sample.name.endswith("total"))
        assert counted == delivered
