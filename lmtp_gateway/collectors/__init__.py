"""Collectors: where mail comes from when Postfix cannot hand it over (IMAP IDLE, Microsoft Graph).

A collector is a ``Source``: it lists what is waiting in a mailbox, fetches it without changing anything there,
and only once the message is in the journal *settles* it (marks it read or deletes it). The loop that drives a
source — arbitration, journal, settling, reconnecting — lives in ``lmtp_gateway.collect`` and is the same for
every kind of mailbox.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Ref:
    """One message waiting in a mailbox, as the source names it."""

    key: str  # stable across collector instances: what the arbitration is keyed by
    handle: str  # what the source needs to fetch and settle it (an IMAP UID, a Graph message id)
    size: int | None = None


class Source(Protocol):
    """A mailbox the gateway collects from."""

    name: str  # for logs: "imap:gitlab@imap.example.com/INBOX"

    async def connect(self) -> None: ...

    async def pending(self, limit: int, skip: Collection[str] = ()) -> list[Ref]:
        """At most `limit` messages not collected yet, oldest first, leaving out those whose key is in `skip`."""
        ...

    async def fetch(self, refs: Sequence[Ref]) -> dict[str, bytes]:
        """The raw messages by handle, leaving them unread on the server. A vanished message is left out."""
        ...

    async def settle(self, refs: Sequence[Ref]) -> None:
        """The messages are safe in the journal: mark them read, or delete them, as configured."""
        ...

    async def wait(self, timeout: float) -> None:
        """Until new mail may be there (IMAP IDLE) or `timeout` has passed (polling)."""
        ...

    async def close(self) -> None: ...
