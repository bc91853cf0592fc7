"""A real DNS server (Debian's ``dnsmasq``) on a free loopback port, answering from records given up front.

For ``lmtp-gateway check``'s MX checks: MX records with ``mx_hosts`` (``--mx-host``), addresses with ``addresses``
(``--address``), and every name under ``local_domains`` that was not given answered NXDOMAIN (``--local``), with no
upstream server and no /etc/hosts, so nothing depends on the machine's own DNS.
"""

from __future__ import annotations

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

__all__ = ["DnsmasqServer"]


class DnsmasqServer(ChildServer):
    """``DnsmasqServer(mx={"incoming.test": ["mx.incoming.test"]}, addresses={"mx.incoming.test": "127.0.0.1"})``"""

    host = LOOPBACK

    def __init__(
        self,
        mx: Mapping[str, Sequence[str]] | None = None,
        addresses: Mapping[str, str] | None = None,
        local_domains: Sequence[str] = ("test",),
    ) -> None:
        self.mx = dict(mx or {})
        self.addresses = dict(addresses or {})
        self.local_domains = tuple(local_domains)
        self.port = free_port()

    @property
    def nameserver(self) -> str:
        """What ``lmtp-gateway check --nameserver`` takes."""
        return f"{self.host}:{self.port}"

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
