"""Logging: one JSON object per line for journald and log shippers, plain lines on a terminal.

Records carry their facts as ``extra`` fields (event, journal_id, mailbox, key, rcpt…); never a message body,
a password or a token: nothing in the code logs those, and the formatter only prints whitelisted fields.
"""

from __future__ import annotations

import json
import logging
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
    "sink",
    "detail",
    "address",
    "latency_ms",
    "attempts",
)


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


def setup_logging(level: str = "info", json_lines: bool | None = None) -> None:
    """JSON unless standard error is a terminal (or `json_lines` says otherwise)."""
    handler = logging.StreamHandler(sys.stderr)
    use_json = not sys.stderr.isatty() if json_lines is None else json_lines
    handler.setFormatter(JsonFormatter() if use_json else TerminalFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("mail.log", "httpx", "httpcore", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
