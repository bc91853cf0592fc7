"""Every exception the package raises on purpose, and the one wording of operating-system errors.

A leaf module: it imports nothing of the package, so any module may raise these without an import circle.
Each class says which way a failure goes: the operator fixes something (``ConfigError``, ``ListenError``), or the
gateway tries again later (``JournalError``, ``SourceError``).
"""

from __future__ import annotations

import errno
import os


class GatewayError(Exception):
    """Base of the errors below: what the command line prints as one line, never as a traceback."""


class ConfigError(GatewayError):
    """A configuration problem, phrased so the admin knows what to fix (file, dotted key, what is wrong)."""


class SecretError(ConfigError):
    """A secret the configuration names cannot be had here (a variable not set, a file not readable): the
    configuration may be right, and the environment the command runs in is what to fix."""


class ListenError(GatewayError):
    """A listener cannot be opened (the port is taken, the socket's directory is not ours)."""


class JournalError(GatewayError):
    """The journal cannot take the message now (disk full, I/O error): a temporary failure."""


class SourceError(GatewayError):
    """A collected mailbox cannot be used right now (network, server refusal, bad credentials): reconnect later."""


class TemplateError(ValueError):
    """An address template GitLab could not use."""


def os_error_text(error: OSError) -> str:
    """ "Address already in use": the system's own words, without the address asyncio repeats around them."""
    return os.strerror(error.errno) if error.errno else str(error)


_STORAGE_PHRASES = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk full",
    errno.EROFS: "file system is read-only",
    errno.EACCES: "directory not writable",
    errno.EPERM: "directory not writable",
}


def storage_error_text(error: OSError, what: str = "journal") -> str:
    """ "journal disk full": what an LMTP reply, a log line or `check` says of a file-system error in `what`."""
    phrase = _STORAGE_PHRASES.get(error.errno or 0)
    if phrase is not None:
        return f"{what} {phrase}"
    return f"{what} I/O error ({errno.errorcode.get(error.errno or 0, 'unknown')})"
