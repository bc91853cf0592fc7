"""A real Dovecot (IMAP + LMTP) on free loopback ports, for tests/benchmarks.

Supports the Dovecot 2.3 configuration syntax (Debian 12 ships 2.3.19.1).
Dovecot 2.4 rewrote most settings (``mail_location``, ``passdb`` blocks,
``auth_allow_cleartext`` ...); starting under 2.4 fails loudly instead of
running with a half-understood config.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import (
    LOOPBACK,
    ChildServer,
    _register,
    free_port,
    require_binary,
    start_process,
    wait_until,
)

__all__ = ["DEFAULT_USERS", "DovecotServer", "dovecot_version"]

DEFAULT_USERS: Mapping[str, str] = {"gitlab": "secret"}
DOVECOT_PACKAGES = "dovecot-imapd dovecot-lmtpd"

_USER_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
# Where Debian (and most distributions) put imap, lmtp, imap-login ...
_LIBEXEC_DIRS = (Path("/usr/lib/dovecot"), Path("/usr/libexec/dovecot"))


@functools.cache
def dovecot_version(binary: str) -> tuple[int, ...]:
    """``dovecot --version`` as a tuple, e.g. ``(2, 3, 19, 1)``."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.match(r"\s*(\d+(?:\.\d+)*)", out)
    if not match:
        raise RuntimeError(f"cannot parse `dovecot --version` output: {out!r}")
    return tuple(int(part) for part in match.group(1).split("."))


class DovecotServer(ChildServer):
    """Throw-away Dovecot 2.3 serving IMAP and LMTP on 127.0.0.1.

    Everything (config, sockets, state, logs, mail) lives in one temporary
    directory; nothing in /etc, /var/run or /var/lib is read or written, and
    the system's own Dovecot service is neither needed nor touched. Its orderly
    shutdown always sleeps 1 s (the master waits for its log process);
    ``stop(graceful=False)`` SIGKILLs the whole process group at once instead.

    Accepted LMTP recipients (``RCPT TO``):

    * default mode: ``<user>[+detail]@<any domain>`` for every configured
      user, local part case-insensitive - e.g. ``gitlab@localhost``,
      ``GitLab@example.com``, ``gitlab+reply-abc@anything``. The domain is
      ignored and the ``+detail`` is dropped; mail always goes to the
      user's INBOX (``maildir(user) / "new"``). Unknown local parts get
      ``550 5.1.1 User doesn't exist``.
    * ``catch_all=True``: *any* address is accepted and delivered to the
      INBOX of the first configured user (``self.user``); every user then
      also sees that same mailbox over IMAP.

    IMAP login: ``user`` (or ``user@anything``) with its password, cleartext
    (``LOGIN`` / ``AUTHENTICATE PLAIN``), no TLS.

    When run as root, mail is owned by the unprivileged ``mail`` user
    (Dovecot refuses to access mail as root), helpers run as ``dovecot`` /
    ``dovenull`` and the temporary directory is made world-traversable; the
    test process can still read every file. As non-root, everything runs as
    the current user.
    """

    host: str = LOOPBACK

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        *,
        catch_all: bool = False,
        binary: str | None = None,
        start_timeout: float = 60.0,
        mail_user: str | None = None,
        extra_config: str = "",
    ) -> None:
        """Configure, but do not start, a server.

        ``users`` maps login name to password (default ``gitlab``/``secret``;
        names are lower-case, the first one is ``self.user``). ``mail_user``
        overrides the system account owning the mail when running as root.
        ``extra_config`` is appended verbatim to dovecot.conf, e.g. to raise
        ``service lmtp { process_limit = ... }`` for a benchmark.
        """
        self._users = dict(DEFAULT_USERS if users is None else users)
        if not self._users:
            raise ValueError("at least one user is required")
        for name, password in self._users.items():
            if not _USER_RE.match(name):
                raise ValueError(f"invalid user name {name!r} (use [a-z0-9._-])")
            if any(c in password for c in ":\r\n"):
                raise ValueError(f"password for {name!r} may not contain ':'")
        self._catch_all = catch_all
        self._binary = binary
        self._start_timeout = start_timeout
        self._mail_user = mail_user
        self._extra_config = extra_config
        self._imap_port: int | None = None
        self._lmtp_port: int | None = None
        # Ports may be re-picked only until the server first came up, so a
        # stop()/start() cycle keeps the addresses clients were given.
        self._may_repick_ports = True
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None

    # -- public API ---------------------------------------------------------

    @property
    def imap_port(self) -> int:
        """Plain IMAP port (no TLS)."""
        if self._imap_port is None:
            self._imap_port = free_port()
        return self._imap_port

    @property
    def lmtp_port(self) -> int:
        """LMTP port (TCP, not the usual unix socket)."""
        while self._lmtp_port is None or self._lmtp_port == self.imap_port:
            self._lmtp_port = free_port()
        return self._lmtp_port

    @property
    def user(self) -> str:
        """The first (default) user's login name."""
        return next(iter(self._users))

    @property
    def password(self) -> str:
        """The first (default) user's password."""
        return self._users[self.user]

    @property
    def users(self) -> dict[str, str]:
        """All configured users and their passwords (a copy)."""
        return dict(self._users)

    @property
    def config_path(self) -> Path:
        """The generated dovecot.conf."""
        return self.tmpdir / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        """Dovecot's log (errors and info, e.g. ``saved mail to INBOX``)."""
        return self.tmpdir / "dovecot.log"

    def maildir(self, user: str | None = None) -> Path:
        """Root of ``user``'s Maildir (INBOX); new mail lands in ``/new``.

        In ``catch_all`` mode every user maps to the default user's Maildir.
        """
        name = self.user if user is None or self._catch_all else user.lower()
        if name not in self._users:
            raise KeyError(f"unknown user {user!r}")
        return self.tmpdir / "mail" / name / "Maildir"

    def start(self) -> DovecotServer:
        """Start ``dovecot -F`` and wait for the IMAP and LMTP greetings."""
        if self.running:
            return self
        binary = self._binary or require_binary("dovecot", DOVECOT_PACKAGES)
        version = dovecot_version(binary)
        if version[:2] != (2, 3):
            raise RuntimeError("DovecotServer writes Dovecot 2.3 config syntax, found " + ".".join(map(str, version)))
        _check_protocol_binaries()
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="dovecot-test-"))
        _register(self)
        attempts = 3 if self._may_repick_ports else 1
        for attempt in range(attempts):
            try:
                self._spawn(binary)
                self._may_repick_ports = False
                return self
            except (RuntimeError, TimeoutError):
                self._kill()
                if attempt + 1 < attempts and self._port_was_taken():
                    # Lost the race for a free port; pick new ones.
                    self._imap_port = self._lmtp_port = None
                    continue
                self.stop()
                raise
        raise AssertionError("unreachable")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<DovecotServer imap={self._imap_port} lmtp={self._lmtp_port} {state}>"

    # -- internals ----------------------------------------------------------

    def _spawn(self, binary: str) -> None:
        tmp = self.tmpdir
        if re.search(r"\s", str(tmp)):
            raise RuntimeError(f"temporary path contains whitespace: {tmp}")
        accounts = _Accounts.detect(self._mail_user)
        if os.geteuid() == 0:
            # The mail user and the login user must traverse into tmp.
            tmp.chmod(0o755)
        # A failed earlier attempt may have left a master.pid behind.
        shutil.rmtree(tmp / "run", ignore_errors=True)
        (tmp / "state").mkdir(exist_ok=True)
        mail_root = tmp / "mail"
        for path in [mail_root] + [
            mail_root / name / "Maildir" / sub for name in self._users for sub in ("cur", "new", "tmp")
        ]:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in [mail_root, *mail_root.rglob("*")]:
            os.chown(path, accounts.mail_uid, accounts.mail_gid)
        users_file = tmp / "users"
        users_file.write_text(
            "".join(f"{name}:{{PLAIN}}{password}::::{mail_root / name}::\n" for name, password in self._users.items())
        )
        users_file.chmod(0o644)  # read by the auth process (internal user)
        self.config_path.write_text(self._render_config(accounts))
        self._proc = start_process(
            [binary, "-F", "-c", str(self.config_path)],
            cwd=tmp,
            output=tmp / "dovecot.stdout",
        )
        wait_until(
            self._greets,
            timeout=self._start_timeout,
            what=f"dovecot imap={self.imap_port} lmtp={self.lmtp_port}",
            proc=self._proc,
            log_files=[self.log_path, tmp / "dovecot.stdout"],
        )

    def _render_config(self, acc: _Accounts) -> str:
        tmp = self.tmpdir
        users_file = tmp / "users"
        if self._catch_all:
            userdb = f"""\
userdb {{
  driver = static
  args = home={tmp / "mail" / self.user} allow_all_users=yes
}}"""
        else:
            userdb = f"""\
userdb {{
  driver = passwd-file
  args = username_format=%Ln {users_file}
}}"""
        return f"""\
# Generated by tests/servers/dovecot.py - Dovecot 2.3 syntax, self-contained
# (no !include of /etc/dovecot).
instance_name = dovecot-test-{self.imap_port}
base_dir = {tmp / "run"}
state_dir = {tmp / "state"}
log_path = {self.log_path}
info_log_path = {self.log_path}
debug_log_path = {self.log_path}
verbose_proctitle = yes

ssl = no
protocols = imap lmtp
listen = {self.host}

# Cleartext logins over loopback without TLS.
disable_plaintext_auth = no
auth_mechanisms = plain login
# Lower-case whole name; the passwd-file lookup then drops the domain.
auth_username_format = %Lu

default_internal_user = {acc.internal_user}
default_internal_group = {acc.internal_group}
default_login_user = {acc.login_user}
# Dovecot never accesses mail as root, so use an unprivileged account and
# lower the uid/gid floor to allow system accounts like `mail` (uid 8).
mail_uid = {acc.mail_uid}
mail_gid = {acc.mail_gid}
first_valid_uid = {acc.mail_uid}
first_valid_gid = {acc.mail_gid}
mail_location = maildir:~/Maildir

# user+detail@domain -> user's INBOX, never a detail mailbox.
recipient_delimiter = +
lmtp_save_to_detail_mailbox = no

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%Ln {users_file}
}}
{userdb}

protocol imap {{
  # Benchmarks open many sessions from the same user and address.
  mail_max_userip_connections = 1000
}}

service imap-login {{
  chroot =
  inet_listener imap {{
    address = {self.host}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {self.host}
    port = {self.lmtp_port}
  }}
}}
service anvil {{
  chroot =
}}
{acc.extra_services}
{self._extra_config}
"""

    def _greets(self) -> bool:
        """True once IMAP sends ``* OK`` and LMTP sends ``220``."""
        return _greeting(self.host, self.imap_port, b"* OK") and _greeting(self.host, self.lmtp_port, b"220 ")

    def _port_was_taken(self) -> bool:
        text = ""
        for name in ("dovecot.log", "dovecot.stdout"):
            with contextlib.suppress(OSError):
                text += (self.tmpdir / name).read_text(errors="replace")
        return "Address already in use" in text


def _greeting(host: str, port: int, prefix: bytes) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            return sock.recv(512).startswith(prefix)
    except OSError:
        return False


def _check_protocol_binaries() -> None:
    """Turn a missing dovecot-imapd/-lmtpd into a clear skip/failure."""
    for libexec in _LIBEXEC_DIRS:
        if libexec.is_dir():
            for name, package in (("imap", "dovecot-imapd"), ("lmtp", "dovecot-lmtpd")):
                if not (libexec / name).exists():
                    require_binary(f"dovecot-{name}", package)
            return


@dataclass(frozen=True)
class _Accounts:
    """System accounts Dovecot runs as; depends on whether we are root."""

    internal_user: str
    internal_group: str
    login_user: str
    mail_uid: int
    mail_gid: int
    extra_services: str

    @classmethod
    def detect(cls, mail_user: str | None) -> _Accounts:
        if os.geteuid() != 0:
            # Rootless: every service runs as us; nothing can switch users.
            me = pwd.getpwuid(os.geteuid())
            return cls(
                internal_user=me.pw_name,
                internal_group=grp.getgrgid(me.pw_gid).gr_name,
                login_user=me.pw_name,
                mail_uid=me.pw_uid,
                mail_gid=me.pw_gid,
                extra_services=("service auth-worker {\n  user = $default_internal_user\n}\n"),
            )
        mail = _first_account([mail_user] if mail_user else ["mail", "nobody"], "mail owner")
        internal = _first_account(["dovecot", "nobody"], "internal user")
        login = _first_account(["dovenull", "nobody"], "login user")
        return cls(
            internal_user=internal.pw_name,
            internal_group=grp.getgrgid(internal.pw_gid).gr_name,
            login_user=login.pw_name,
            mail_uid=mail.pw_uid,
            mail_gid=mail.pw_gid,
            extra_services="",
        )


def _first_account(names: list[str], role: str) -> pwd.struct_passwd:
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(f"no system account for the Dovecot {role}: tried {names}")
