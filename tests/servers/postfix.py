"""A real Postfix MTA on a free loopback port, relaying to an LMTP next hop.

This is the Postfix in front of the gateway, as in production: it accepts
mail for the incoming domain(s), verifies every recipient against the LMTP
next hop *during* the SMTP session (``reject_unverified_recipient``, so an
unknown address gets ``550`` at ``RCPT`` and no bounce is ever sent), queues
accepted mail and hands it over with the ``lmtp`` client.

Written for Postfix 3.7 (Debian 12); needs 3.4+ for ``maillog_file``. Must
run as root: the master starts its daemons as the ``postfix`` user.

Everything lives in one temporary directory (config, queue, data, log); the
system's ``/etc/postfix``, ``/var/spool/postfix`` and a system Postfix
instance are neither needed nor touched. ``postfix -c DIR check`` runs first
(the integrity check and queue set-up ``postfix start`` does), then, instead
of ``postfix start`` (whose master daemonizes, re-parented to init), the
master runs in the foreground (``master -s``) under a tiny Python supervisor
child, so it is stopped like every other server here: by ``stop()``, the
context manager, at interpreter exit or when the test process dies. The
supervisor is needed for the last case: the master briefly switches its
effective uid to ``postfix``, which makes Linux forget its parent-death
signal; the supervisor keeps it and passes it on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import (
    LOOPBACK,
    ChildServer,
    OnePort,
    _register,
    free_port,
    group_alive,
    process_running,
    require_binary,
    start_process,
    stop_process,
    wait_until,
)

__all__ = ["TEST_ONLY_SETTINGS", "PostfixServer", "lmtp_next_hop", "postfix_version"]

DEFAULT_MESSAGE_SIZE_LIMIT = 25 * 1024 * 1024
GITLAB_HOST_ADDRESS = "127.0.0.2"  # the one loopback address in mynetworks

# Settings that make a test run fast but have no place in production: the
# queue is rescanned every second and a deferred message retried after 1-2 s
# (production defaults: 300s / 300s / 4000s), and the address verification
# cache forgets quickly so that a test changing what the next hop accepts
# sees the change within seconds (production defaults: days).
TEST_ONLY_SETTINGS: Mapping[str, str] = {
    "queue_run_delay": "1s",
    "minimal_backoff_time": "1s",
    "maximal_backoff_time": "2s",
    # A positive answer is re-checked in the background after 5 s, but kept
    # for an hour: a next hop that is down does not turn a known recipient
    # into an unknown one (a temporary failure never replaces a result).
    "address_verify_positive_refresh_time": "5s",
    "address_verify_positive_expire_time": "1h",
    "address_verify_negative_refresh_time": "2s",
    "address_verify_negative_expire_time": "10s",
}

_QUEUE_ID_RE = r"[0-9A-Za-z]+"

# Runs `master -s` (which makes itself a session leader) and stays its
# parent: SIGTERM/SIGINT/SIGHUP are forwarded (the master answers SIGTERM by
# terminating its process group), and once the master is gone, whatever is
# left of its group is SIGKILLed while the unreaped master still reserves
# the group id. argv: PID_FILE MASTER_ARGV...
_SUPERVISOR = """\
import os, signal, subprocess, sys
pending = []
master = None
def forward(signum, frame):
    if master is None:
        pending.append(signum)
        return
    try:
        os.kill(master.pid, signum)
    except ProcessLookupError:
        pass
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, forward)
master = subprocess.Popen(sys.argv[2:])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(master.pid))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
for signum in pending:
    forward(signum, None)
try:
    os.waitid(os.P_PID, master.pid, os.WEXITED | os.WNOWAIT)
except ChildProcessError:
    pass
try:
    os.killpg(master.pid, signal.SIGKILL)
except OSError:
    pass
sys.exit(master.wait())
"""
_BOUNCE_RE = re.compile(rf"\b({_QUEUE_ID_RE}): sender non-delivery notification: ({_QUEUE_ID_RE})\b")


@functools.cache
def postfix_version(postconf: str) -> tuple[int, ...]:
    """``mail_version`` as a tuple, e.g. ``(3, 7, 11)``."""
    out = subprocess.run([postconf, "-dh", "mail_version"], capture_output=True, text=True, check=True).stdout
    match = re.match(r"\s*(\d+(?:\.\d+)*)", out)
    if not match:
        raise RuntimeError(f"cannot parse `postconf -dh mail_version` output: {out!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A throw-away certificate for smtpd's TLS settings (Debian's snakeoil one may not be installed)."""
    cert, key = directory / "mx.pem", directory / "mx.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=mx.test",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


def postfix_for_gateway(
    command: Sequence[str], config: Path, domains: Sequence[str], lmtp_port: int, workdir: Path
) -> PostfixServer:
    """A Postfix (not yet started) configured with exactly what `lmtp-gateway postfix-config` prints for
    `config`; `command` runs lmtp-gateway. Only the certificate paths are replaced (site-specific)."""

    fragments = {
        part: subprocess.run(
            [*command, "postfix-config", "--config", str(config), f"--{part}-cf"],
            capture_output=True, text=True, check=True,
        ).stdout
        for part in ("main", "master")
    }  # fmt: skip
    main_cf = parse_main_cf(fragments["main"])
    cert, key = self_signed_certificate(workdir)
    main_cf.update(smtpd_tls_cert_file=str(cert), smtpd_tls_key_file=str(key))
    return PostfixServer(
        domains,
        lmtp_next_hop(lmtp_port),  # the fragment's transport_maps (gitlab-lmtp:...) takes its place
        message_size_limit=int(main_cf["message_size_limit"]),
        extra_main_cf=main_cf,
        extra_master_cf=fragments["master"],
    )


def lmtp_next_hop(port: int, host: str = LOOPBACK) -> str:
    """``lmtp:inet:HOST:PORT``: a transport_maps value for a TCP LMTP server.

    A UNIX socket is ``lmtp:unix:/path``; the socket must be writable by
    the ``postfix`` user, which runs the lmtp client.
    """
    return f"lmtp:inet:{host}:{port}"


class PostfixServer(OnePort, ChildServer):
    """Throw-away Postfix relaying ``domains`` to an LMTP ``next_hop``.

    Usage::

        with DovecotServer() as lmtp, PostfixServer(
            ["incoming.test"], lmtp_next_hop(lmtp.lmtp_port), message_size_limit=100_000
        ) as mta:
            smtplib.SMTP(mta.host, mta.port).sendmail(...)
            mta.wait_queue_empty()

    ``next_hop`` is a transport_maps value such as
    ``lmtp:inet:127.0.0.1:2424`` or ``lmtp:unix:/run/gw.sock``. Mail for any
    other domain is refused (``554 Relay access denied``); DSNs Postfix
    generates (to senders outside ``domains``) stay in the deferred queue
    (``default_transport = retry``), so a test can read them with
    :meth:`message` - and see them with :meth:`bounces`.

    The first ``RCPT`` to a not yet verified address takes about one second
    (``address_verify_poll_delay`` cannot be shorter); later ones are
    answered from the cache.
    """

    host: str = LOOPBACK
    myhostname: str = "mx.test"

    def __init__(
        self,
        domains: Sequence[str],
        next_hop: str,
        *,
        message_size_limit: int = DEFAULT_MESSAGE_SIZE_LIMIT,
        extra_main_cf: Mapping[str, str] | None = None,
        extra_master_cf: str = "",
        port: int | None = None,
        start_timeout: float = 60.0,
        resolv_conf: str | None = None,
    ) -> None:
        """Configure, but do not start, a server.

        ``extra_main_cf`` adds or overrides main.cf parameters (including
        the :data:`TEST_ONLY_SETTINGS`), e.g. ``{"smtputf8_enable": "no"}``.

        ``resolv_conf``: the text Postfix's daemons read as
        ``/etc/resolv.conf`` (its DNS resolver has no other setting for the
        server to ask, and the file has no port). The master then runs in a
        mount namespace of its own, with this file bind-mounted over
        ``/etc/resolv.conf`` (``unshare --mount``, which needs root, as
        Postfix does); the machine's file is untouched.
        """
        if isinstance(domains, str):
            raise TypeError("domains must be a list of domain names, not a string")
        self._domains = [d.strip().lower() for d in domains]
        if not self._domains or any(not d or re.search(r"[\s,={}]", d) for d in self._domains):
            raise ValueError(f"invalid domains: {domains!r}")
        _check_next_hop(next_hop)
        if message_size_limit <= 0:
            raise ValueError("message_size_limit must be positive")
        self._next_hop = next_hop
        self._message_size_limit = message_size_limit
        self._extra_main_cf = dict(extra_main_cf or {})
        self._extra_master_cf = extra_master_cf
        self._port = port
        self._may_repick_port = port is None
        self._start_timeout = start_timeout
        self._resolv_conf = resolv_conf
        self._proc: subprocess.Popen[bytes] | None = None  # the supervisor
        self._master_pid: int | None = None
        self._tmpdir: Path | None = None

    # -- public API ---------------------------------------------------------

    @property
    def domains(self) -> list[str]:
        """The relay domains routed to the next hop (a copy)."""
        return list(self._domains)

    @property
    def next_hop(self) -> str:
        """The current transport_maps value, e.g. ``lmtp:inet:127.0.0.1:2424``."""
        return self._next_hop

    @property
    def message_size_limit(self) -> int:
        """Postfix's ``message_size_limit`` in bytes."""
        return self._message_size_limit

    @property
    def config_dir(self) -> Path:
        """Holds main.cf and master.cf; pass as ``-c`` to Postfix commands."""
        return self.tmpdir / "etc"

    @property
    def queue_dir(self) -> Path:
        """``queue_directory`` (incoming, active, deferred, ...)."""
        return self.tmpdir / "queue"

    @property
    def data_dir(self) -> Path:
        """``data_directory``: the address verification cache lives here."""
        return self.tmpdir / "data"

    @property
    def maillog(self) -> Path:
        """The mail log (``maillog_file``), what syslog would get."""
        return self.tmpdir / "maillog"

    @property
    def pid(self) -> int | None:
        """PID of the master (also the process-group id of all daemons)."""
        return self._master_pid if self.running else None

    def start(self) -> PostfixServer:
        """Write the config, ``postfix check``, start master, await the banner."""
        if self.running:
            return self
        postconf = require_binary("postconf", "postfix")
        version = postfix_version(postconf)
        if version < (3, 4):
            raise RuntimeError("PostfixServer needs Postfix 3.4+ (maillog_file), found " + ".".join(map(str, version)))
        if os.geteuid() != 0:
            reason = "PostfixServer must run as root (the master switches to the postfix user)"
            try:
                import pytest
            except ImportError:
                raise RuntimeError(reason) from None
            pytest.skip(reason)
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="postfix-test-"))
        _register(self)
        attempts = 3 if self._may_repick_port else 1
        for attempt in range(attempts):
            try:
                self._spawn()
                self._may_repick_port = False
                return self
            except (RuntimeError, TimeoutError):
                self._kill()
                if attempt + 1 < attempts and self._port_was_taken():
                    self._port = free_port()
                    continue
                self.stop()
                raise
        raise AssertionError("unreachable")

    def reload(self, timeout: float = 30.0) -> None:
        """``postfix reload`` and wait until the master has re-read its config.

        Idle daemons restart with the new settings right away; a daemon busy
        with a request finishes it with the old ones.
        """
        before = self._count_log("reload -- version")
        self.postfix("reload")
        wait_until(
            lambda: self._count_log("reload -- version") > before,
            timeout=timeout,
            what="postfix reload",
            proc=self._proc,
            log_files=[self.maillog],
        )

    def set_next_hop(self, next_hop: str, *, reload: bool = True) -> None:
        """Route the domains to another LMTP server (rewrites main.cf)."""
        _check_next_hop(next_hop)
        self._next_hop = next_hop
        if self._tmpdir is not None:
            self._write_main_cf()
            if reload and self.running:
                self.reload()

    def set_relayhost(self, relayhost: str) -> None:
        """Send mail for every other domain to `relayhost` (``[host]:port``), as a site's smarthost."""
        self._extra_main_cf.update(relayhost=relayhost, default_transport="smtp")
        self._write_main_cf()
        self.reload()

    def postfix(self, *args: str, timeout: float = 30.0) -> str:
        """Run ``postfix -c CONFIG_DIR ARGS...``; return its output."""
        return self._run(require_binary("postfix", "postfix"), *args, timeout=timeout)

    def postconf(self, name: str) -> str:
        """The effective value of a main.cf parameter (``postconf -h``)."""
        return self._run(require_binary("postconf", "postfix"), "-h", name).strip()

    def maillog_text(self) -> str:
        """The mail log so far (empty before the first line)."""
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Wait until a maillog line matches the regex; return the match."""
        regex = re.compile(pattern, re.MULTILINE)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = regex.search(self.maillog_text())
            if match:
                found.append(match)
            return match is not None

        wait_until(seen, timeout=timeout, what=f"maillog line /{pattern}/", proc=self._proc, log_files=[self.maillog])
        return found[0]

    def log_lines(self, queue_id: str) -> list[str]:
        """The maillog lines of one message (``ID: ...``)."""
        marker = f" {queue_id}: "
        return [line for line in self.maillog_text().splitlines() if marker in line]

    def queue(self) -> list[dict[str, Any]]:
        """Every queued message as ``postqueue -j`` reports it.

        Keys: ``queue_name`` (incoming, active, deferred, hold), ``queue_id``,
        ``arrival_time``, ``message_size``, ``sender`` and ``recipients``
        (``address``, ``delay_reason`` once deferred).
        """
        out = self._run(require_binary("postqueue", "postfix"), "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def queue_ids(self) -> list[str]:
        """Queue ids of every message in the queue (also verify probes in flight)."""
        return [entry["queue_id"] for entry in self.queue()]

    def flush(self) -> None:
        """``postqueue -f``: retry every deferred message now."""
        self._run(require_binary("postqueue", "postfix"), "-f")

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        """Wait until no message (mail, DSN or probe) is left in the queue."""
        wait_until(
            lambda: not self.queue(),
            timeout=timeout,
            what="postfix queue empty",
            proc=self._proc,
            log_files=[self.maillog],
            interval=0.05,
        )

    def wait_deferred(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until at least one message is deferred; return the deferred ones."""
        found: list[dict[str, Any]] = []

        def deferred() -> bool:
            found[:] = [entry for entry in self.queue() if entry["queue_name"] == "deferred"]
            return bool(found)

        wait_until(deferred, timeout=timeout, what="a deferred message", proc=self._proc, log_files=[self.maillog])
        return found

    def bounces(self) -> list[str]:
        """Queue ids of the DSNs (bounces) Postfix generated so far.

        Read from the maillog (``ID: sender non-delivery notification:
        DSN_ID``), so also DSNs already delivered or expired are counted.
        """
        return [match.group(2) for match in _BOUNCE_RE.finditer(self.maillog_text())]

    def message(self, queue_id: str) -> bytes:
        """Headers and body of a queued message (``postcat -hb -q ID``)."""
        out = subprocess.run(
            [require_binary("postcat", "postfix"), "-c", str(self.config_dir), "-hb", "-q", queue_id],
            capture_output=True,
            check=True,
            timeout=30,
        )
        return out.stdout

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PostfixServer {self.host}:{self._port} -> {self._next_hop} {state}>"

    # -- internals ----------------------------------------------------------

    def _spawn(self) -> None:
        tmp = self.tmpdir
        if re.search(r"[\s,={}]", str(tmp)):
            raise RuntimeError(f"temporary path unusable in main.cf: {tmp}")
        # Daemons run as the postfix user, not chrooted: they must traverse
        # into tmp to reach the queue and data directories.
        tmp.chmod(0o755)
        self.config_dir.mkdir(exist_ok=True)
        # `postfix` chdirs into the queue directory before anything else;
        # `check` then creates its subdirectories and data_directory.
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)
        self._write_main_cf()
        _write_settled(self.config_dir / "master.cf", self._render_master_cf())
        # Same as `postfix start` before it starts the master: create the
        # queue and data directories with the right owners, sanity-check.
        check = subprocess.run(
            [require_binary("postfix", "postfix"), "-c", str(self.config_dir), "check"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check.returncode != 0:
            log = self.maillog_text()[-4000:]
            raise RuntimeError(f"postfix check failed:\n{check.stdout}{check.stderr}\n--- {self.maillog} ---\n{log}")
        master = Path(self.postconf("daemon_directory")) / "master"
        pid_file = tmp / "supervisor.pid"
        pid_file.unlink(missing_ok=True)
        self._proc = start_process(
            [
                *self._namespace_prefix(),
                *(sys.executable, "-c", _SUPERVISOR, str(pid_file), str(master), "-c", str(self.config_dir), "-s"),
            ],
            cwd=tmp,
            output=tmp / "master.stdout",
        )
        log_files = [self.maillog, tmp / "master.stdout"]
        wait_until(pid_file.exists, timeout=self._start_timeout, what="postfix master", proc=self._proc)
        self._master_pid = int(pid_file.read_text())
        wait_until(
            self._greets,
            timeout=self._start_timeout,
            what=f"postfix smtpd on port {self.port}",
            proc=self._proc,
            log_files=log_files,
        )

    def _namespace_prefix(self) -> list[str]:
        """What runs the supervisor with a private /etc/resolv.conf: `unshare` and `sh` both exec (no fork), so
        the supervisor keeps the process id (and the parent-death signal) of the child started here."""
        if self._resolv_conf is None:
            return []
        resolv = self.tmpdir / "resolv.conf"
        resolv.write_text(self._resolv_conf)
        resolv.chmod(0o644)  # read by the daemons, as user postfix
        require_binary("mount", "mount")
        bind = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        unshare = require_binary("unshare", "util-linux")
        return [unshare, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", bind, str(resolv)]

    def _main_cf(self) -> dict[str, str]:
        tmp = self.tmpdir
        transport = ", ".join(f"{domain}={self._next_hop}" for domain in self._domains)
        settings = {
            "compatibility_level": "3.6",
            # -- where things are: all in tmp
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            # Logging to a file, no syslog: needs the postlog service in
            # master.cf, and the file must be under maillog_file_prefixes
            # (default /var, /dev/stdout).
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(tmp),
            # -- who we are, what we accept
            "inet_interfaces": self.host,
            "inet_protocols": "ipv4",
            "myhostname": self.myhostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            # GitLab's host in the tests is 127.0.0.2 (its notifications go out through this Postfix); test
            # clients connect from 127.0.0.1, like a server on the internet.
            "mynetworks": f"{GITLAB_HOST_ADDRESS}/32",
            "relay_domains": ", ".join(self._domains),
            "transport_maps": f"inline:{{ {transport} }}",
            "recipient_delimiter": "+",
            "message_size_limit": str(self._message_size_limit),
            "mailbox_size_limit": "0",
            "smtpd_banner": "$myhostname ESMTP Postfix (lmtp-gateway test)",
            "smtpd_helo_required": "yes",
            "disable_vrfy_command": "yes",
            # Postfix's own default: GitLab's host (mynetworks) may relay, the
            # test client on 127.0.0.1 is any sending server on the internet.
            "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination",
            "smtpd_recipient_restrictions": "reject_unauth_destination, reject_unverified_recipient",
            # -- recipient verification against the LMTP next hop
            # 550 instead of the default 450 when the next hop said 5xx;
            # 450 (a retry) when it could not be asked.
            "unverified_recipient_reject_code": "550",
            "unverified_recipient_defer_code": "450",
            # The default reason quotes the probe's answer, "host
            # /path/to/socket[...] said: ...". With postconf(5)'s example the
            # reply is "550 5.1.1 <rcpt>: Recipient address rejected:
            # undeliverable address: Recipient address lookup failed" (DSN
            # code from the next hop), and "450 4.1.1 ... unverified address:
            # ..." while the next hop is down - so no "User unknown" here.
            "unverified_recipient_reject_reason": "Recipient address lookup failed",
            "address_verify_map": f"btree:{self.data_dir}/verify_cache",
            # smtpd asks verify, which sends a probe through the queue to the
            # next hop, then smtpd polls every poll_delay (1 s is the floor)
            # until the answer is there: the first RCPT gets the final 550/250
            # after ~1 s instead of a 450 "verification in progress".
            "address_verify_poll_count": "10",
            "address_verify_poll_delay": "1s",
            # -- no local delivery, nothing leaves: DSNs and notices to the
            # outside stay deferred in the queue, readable with postcat.
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "default_transport": "retry:4.4.1 outbound mail disabled in the test server",
            "relayhost": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
            **TEST_ONLY_SETTINGS,
        }
        settings.update(self._extra_main_cf)
        return settings

    def _write_main_cf(self) -> None:
        lines = ["# Generated by tests/servers/postfix.py - a throw-away test instance.\n"]
        lines += [f"{name} = {value}\n" for name, value in self._main_cf().items()]
        _write_settled(self.config_dir / "main.cf", "".join(lines))

    def _render_master_cf(self) -> str:
        # service type private unpriv chroot wakeup maxproc command: only
        # what relaying to LMTP needs, nothing chrooted (no copies of
        # /etc files in the queue directory).
        return (
            f"""\
# Generated by tests/servers/postfix.py
# service   type  private unpriv  chroot  wakeup  maxproc command + args
{self.host}:{self.port} inet n - n - - smtpd
pickup      unix  n       -       n       60      1       pickup
cleanup     unix  n       -       n       -       0       cleanup
qmgr        unix  n       -       n       300     1       qmgr
tlsmgr      unix  -       -       n       1000?   1       tlsmgr
rewrite     unix  -       -       n       -       -       trivial-rewrite
bounce      unix  -       -       n       -       0       bounce
defer       unix  -       -       n       -       0       bounce
trace       unix  -       -       n       -       0       bounce
verify      unix  -       -       n       -       1       verify
flush       unix  n       -       n       1000?   0       flush
proxymap    unix  -       -       n       -       -       proxymap
proxywrite  unix  -       -       n       -       1       proxymap
smtp        unix  -       -       n       -       -       smtp
relay       unix  -       -       n       -       -       smtp
showq       unix  n       -       n       -       -       showq
error       unix  -       -       n       -       -       error
retry       unix  -       -       n       -       -       error
discard     unix  -       -       n       -       -       discard
lmtp        unix  -       -       n       -       -       lmtp
anvil       unix  -       -       n       -       1       anvil
scache      unix  -       -       n       -       1       scache
postlog     unix-dgram n  -       n       -       1       postlogd
"""
            + self._extra_master_cf
        )

    def _run(self, binary: str, *args: str, timeout: float = 30.0) -> str:
        result = subprocess.run(
            [binary, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{Path(binary).name} {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result.stdout

    def _count_log(self, needle: str) -> int:
        return self.maillog_text().count(needle)

    def _greets(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                ready = sock.recv(512).startswith(b"220 ")
                if ready:
                    sock.sendall(b"QUIT\r\n")  # no "lost connection" noise in the maillog
                    sock.recv(512)
                return ready
        except OSError:
            return False

    def _kill(self, graceful: bool = True) -> None:
        """The master gets SIGTERM and terminates its whole process group (what ``postfix stop`` does, without its
        one-second polling sleep); whatever is left is SIGKILLed. ``graceful=False`` SIGKILLs at once."""
        if self._proc is None:
            return
        master = self._master_pid
        if not graceful and master is not None and process_running(self._proc):
            # The master is still the supervisor's unreaped child: its pid
            # (the group id) cannot have been recycled.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(master, signal.SIGKILL)
        # SIGTERM to the supervisor reaches the master; its group is gone
        # when the supervisor exits.
        stop_process(self._proc, timeout=10.0, graceful=graceful)
        self._proc = None
        self._master_pid = None
        if master is not None:
            # Only if the supervisor itself was killed before it could
            # clean up (a probe, and a kill of a group that is still ours).
            deadline = time.monotonic() + 2.0
            while group_alive(master) and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(master, signal.SIGKILL)
                time.sleep(0.01)

    def _port_was_taken(self) -> bool:
        text = self.maillog_text()
        with contextlib.suppress(OSError, RuntimeError):
            text += (self.tmpdir / "master.stdout").read_text(errors="replace")
        return "Address already in use" in text


def _write_settled(path: Path, text: str) -> None:
    """Write a config file atomically, with an mtime a minute in the past.

    Every Postfix program re-reads a main.cf modified within the last
    second or two, pausing 300 ms each time, until it "settles" - 2 s of
    sleep per command right after writing it. An old mtime avoids that.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    past = time.time() - 60
    os.utime(tmp, (past, past))
    tmp.replace(path)


def _check_next_hop(next_hop: str) -> None:
    if not re.fullmatch(r"[a-z0-9-]+:[^\s,={}]+", next_hop):
        raise ValueError(f"invalid next hop {next_hop!r} (want e.g. lmtp:inet:127.0.0.1:2424 or lmtp:unix:/path)")


def parse_main_cf(text: str) -> dict[str, str]:
    """name = value pairs of a main.cf text, continuation lines joined, comments dropped (as postconf reads it)."""
    settings: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and name is not None:
            settings[name] = f"{settings[name]} {line.strip()}".strip()
            continue
        name, _, value = line.partition("=")
        name = name.strip()
        settings[name] = value.strip()
    return settings
