"""Shared test helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmtp_gateway.rules import RoutingTable

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def message(*headers: str, body: str = "Hello\n", crlf: bool = False) -> bytes:
    """A raw message built from header lines."""
    eol = "\r\n" if crlf else "\n"
    return (eol.join(headers) + eol + eol + body).encode()


@pytest.fixture
def table() -> RoutingTable:
    return RoutingTable.build(
        "gitlab.example.com",
        {
            "incoming_email": "incoming+%{key}@incoming.example.com",
            "service_desk_email": "contact+%{key}@incoming.example.com",
        },
    )
