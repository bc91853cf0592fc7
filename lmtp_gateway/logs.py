"""Logging: one JSON object per line for journald and log shippers, plain lines on a terminal.

Records carry their facts as ``extra`` fields (event, journal_id, mailbox, key, rcpt…); never a message body,
a password or a token: nothing in the code logs those, and the formatter only prints whitelisted fields.

Under systemd (stderr connected to the journal, as ``$JOURNAL_STREAM`` says) each line starts with its syslog
priority, ``<3>`` … ``<7>`` (sd-daemon(3)), so ``journalctl -p warning`` shows warnings and errors only. journald
stores and rotates the logs: no log file, no logrotate.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

FIELDS = (
    "event",
    "journal_id",
    "mailbox",
    "key",
    "handler",
    "source",
    "ingress",
    "rcpt",
    "mail_from",
    "verdict",
    "reason",
    "note",
    "sink",
    "detail",
    "address",
    "latency_ms",
    "attempts",
    "worker",
)


_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*:)[^/@\s]*@")


def redact_urls(text: str) -> str:
    """Every ``scheme://user:password@host`` in `text` with the password as ``***``: what goes into a log line,
    a /readyz answer, a journal entry's last error or a `check` line never shows one."""
    return _URL_PASSWORD.sub(r"\1***@", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = value
        if record.exc_info:
            data["error"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


class TerminalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        facts = " ".join(
            f"{name}={getattr(record, name)}" for name in FIELDS if getattr(record, name, None) is not None
        )
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname.lower():7} "
        line += record.getMessage() + (f"  [{facts}]" if facts else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


# sd-daemon(3) / syslog(3) priorities
SYSLOG_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def syslog_priority(levelno: int) -> int:
    return SYSLOG_PRIORITIES.get(levelno, 3 if levelno > logging.WARNING else 6 if levelno > logging.DEBUG else 7)


class PriorityPrefix(logging.Formatter):
    """``<N>`` before every line another formatter makes, for journald."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def connected_to_journald(stream: object) -> bool:
    """systemd sets JOURNAL_STREAM=DEVICE:INODE of the journal's stream socket; it only counts while `stream` is
    still that socket (not redirected by a wrapper script, not a child's inherited variable)."""
    try:
        device, inode = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        status = os.fstat(stream.fileno())  # type: ignore[attr-defined]
    except (ValueError, OSError, AttributeError):
        return False
    return (status.st_dev, status.st_ino) == (device, inode)


class _Worker(logging.Filter):
    """Every line of a worker process says which worker wrote it."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def setup_logging(level: str = "info", json_lines: bool | None = None, *, worker: int | None = None) -> None:
    """JSON unless standard error is a terminal (or `json_lines` says otherwise); priorities for journald."""
    handler = logging.StreamHandler(sys.stderr)
    if worker is not None:
        handler.addFilter(_Worker(worker))
    use_json = not sys.stderr.isatty() if json_lines is None else json_lines
    formatter: logging.Formatter = JsonFormatter() if use_json else TerminalFormatter()
    handler.setFormatter(PriorityPrefix(formatter) if connected_to_journald(sys.stderr) else formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("mail.log", "httpx", "httpcore", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
