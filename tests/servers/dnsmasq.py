"""A real DNS server (Debian's ``dnsmasq``) on a free loopback port, answering from records given up front.

For ``lmtp-gateway check``'s MX checks: MX records with ``mx_hosts`` (``--mx-host``), addresses with ``addresses``
(``--address``), and every name under ``local_domains`` that was not given answered NXDOMAIN (``--local``), with no
upstream server and no /etc/hosts, so nothing depends on the machine's own DNS.

For programs that read ``/etc/resolv.conf`` (Postfix), which has no port: ``host_records`` gives a name several
A records (``--host-record``), and :func:`resolver_address` finds a loopback address whose port 53 is free, to
listen on with ``port=53`` (root only). :attr:`DnsmasqServer.resolv_conf` is then the file's text.
"""

from __future__ import annotations

import contextlib
import random
import socket
import tempfile
from collections.abc import Mapping, Sequence
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

__all__ = ["DnsmasqServer", "resolver_address"]

DNS_PORT = 53


def _port_53_free(host: str) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind((host, DNS_PORT))
            except OSError:
                return False
    return True


def resolver_address(attempts: int = 20) -> str | None:
    """A loopback address (127.53.X.Y, all routed to ``lo`` on Linux) whose DNS port was free a moment ago, or None
    (not root, or nothing free). Random, so parallel test runs do not collide."""
    for _ in range(attempts):
        host = f"127.53.{random.randint(0, 255)}.{random.randint(1, 254)}"
        with contextlib.suppress(OSError):
            if _port_53_free(host):
                return host
    return None


class DnsmasqServer(ChildServer):
    """``DnsmasqServer(mx={"incoming.test": ["mx.incoming.test"]}, addresses={"mx.incoming.test": "127.0.0.1"})``

    ``DnsmasqServer(host_records={"lmtp.incoming.test": ["127.0.0.1", "127.0.0.3"]}, host=resolver_address(),
    port=53)``: one name, two A records, where ``/etc/resolv.conf`` can point."""

    def __init__(
        self,
        mx: Mapping[str, Sequence[str]] | None = None,
        addresses: Mapping[str, str] | None = None,
        local_domains: Sequence[str] = ("test",),
        *,
        host_records: Mapping[str, Sequence[str]] | None = None,
        host: str = LOOPBACK,
        port: int | None = None,
    ) -> None:
        self.mx = dict(mx or {})
        self.addresses = dict(addresses or {})
        self.host_records = {name: tuple(records) for name, records in (host_records or {}).items()}
        self.local_domains = tuple(local_domains)
        self.host = host
        self.port = port or free_port()

    @property
    def nameserver(self) -> str:
        """What ``lmtp-gateway check --nameserver`` takes."""
        return f"{self.host}:{self.port}"

    @property
    def resolv_conf(self) -> str:
        """``/etc/resolv.conf`` naming this server (only meaningful on port 53: the file has no port)."""
        if self.port != DNS_PORT:
            raise ValueError(f"resolv.conf cannot name port {self.port}: start the server with port=53")
        return f"nameserver {self.host}\n"

    def start(self) -> DnsmasqServer:
        binary = require_binary("dnsmasq", "dnsmasq-base")
        self._tmpdir = Path(tempfile.mkdtemp(prefix="dnsmasq-test-"))
        argv = [
            binary,
            "--keep-in-foreground",
            f"--port={self.port}",
            f"--listen-address={self.host}",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            f"--pid-file={self._tmpdir / 'dnsmasq.pid'}",
            "--log-facility=-",
            "--log-queries",
            *(f"--local=/{domain}/" for domain in self.local_domains),
            *(
                f"--mx-host={domain},{host},{10 * (rank + 1)}"
                for domain, hosts in self.mx.items()
                for rank, host in enumerate(hosts)
            ),
            *(f"--address=/{name}/{address}" for name, address in self.addresses.items()),
            # one --host-record per address: the name gets them all, as several A records
            *(f"--host-record={name},{record}" for name, records in self.host_records.items() for record in records),
        ]
        _register(self)
        log = self._tmpdir / "dnsmasq.log"
        self._proc = start_process(argv, cwd=self._tmpdir, output=log)
        wait_until(self._answers, timeout=60, what=f"dnsmasq on port {self.port}", proc=self._proc, log_files=[log])
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False
