"""The journal: the one place durability lives.

A directory an admin can read with ordinary tools::

    spool/
      tmp/                 being written; emptied at start-up (nothing there was ever acknowledged)
      pending/ID.eml       the message as received (hard links: one file for all the copies of one message)
      pending/ID.json      its metadata: envelope, verdict, the envelope headers GitLab gets first, checksum, attempts
      deferred/            waiting for a retry: each .json's modification time is when the retry is due
      delivered/  dropped/  failed/
      quarantine/          entries found damaged, set aside until repaired (never delivered as they are)
      target-named-since   since when the copies to deliver are named by their GitLab target (``store``)

An entry is committed when its ``.eml`` and ``.json`` are written in a state directory and both files and the
directory are flushed to disk; only then may anyone answer ``250``. All of that happens in one I/O thread
(``writer``), so the event loop never waits for the file system.

The ``.json`` is the truth about an entry's state: a state change renames the ``.json`` first and the ``.eml``
follows, and recovery (``recovery``) moves any ``.eml`` left behind to its ``.json``.

An entry's id is the first 24 hex digits of its fingerprint (``entry.fingerprint``), so a Postfix retry of a
message already committed finds its entry instead of making a second one. Looking an id up is a name look-up in
each state directory: the file system is the index.

Formats of an entry (the ``format`` key of its ``.json``): 1, the ``.eml`` holds the envelope headers and the
message, checked by size; 2, the ``.eml`` holds the message alone, shared by its copies, the envelope headers are
in ``prepend``, and ``sha256`` checks the ``.eml``. Both are read; new entries are written in format 2.
"""

from lmtp_gateway.journal.entry import (
    FINISHED,
    FORMAT,
    ID_LENGTH,
    WAITING,
    Draft,
    Entry,
    State,
    envelope_headers,
    fingerprint,
)
from lmtp_gateway.journal.store import DamagedEntry, Journal

__all__ = [
    "FINISHED",
    "FORMAT",
    "ID_LENGTH",
    "WAITING",
    "DamagedEntry",
    "Draft",
    "Entry",
    "Journal",
    "State",
    "envelope_headers",
    "fingerprint",
]
