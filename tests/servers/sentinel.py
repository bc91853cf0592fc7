"""A real Redis Sentinel set-up on free loopback ports: a master, one replica and one Sentinel watching them.

Everything waits on what the servers report (``INFO replication``, ``SENTINEL get-master-addr-by-name``,
``SENTINEL replicas``), never on a fixed sleep. Like ``RedisServer``, no redis-py is needed.

Usage::

    with SentinelGroup() as group:
        client_config = {"url": group.url, "sentinels": group.sentinels}
        old = group.master()
        new = group.failover()        # SENTINEL FAILOVER, returns the promoted node
        newer = group.crash_master()  # SIGKILL, returns the node Sentinel promoted
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Self

from . import LOOPBACK, ChildServer, OnePort, _register, require_binary, start_process, wait_until
from .redis import RedisError, RedisServer, RespValue, resp_command

__all__ = ["MASTER_NAME", "NODE_CONFIG", "LinkRelay", "SentinelGroup", "SentinelServer", "wait_replicating"]

MASTER_NAME = "gitlab-redis"  # what GitLab's Omnibus calls it; the client's URL names it: redis://gitlab-redis/0
# A master waits repl-diskless-sync-delay (5 s) for more replicas before a full sync; here none will come
NODE_CONFIG = {"repl-diskless-sync-delay": "0"}


def _pairs(reply: RespValue) -> dict[str, str]:
    """A flat [key, value, key, value...] reply (SENTINEL MASTER, SENTINEL REPLICAS items) as a dict."""
    if not isinstance(reply, list):
        return {}
    items = [item.decode() if isinstance(item, bytes) else str(item) for item in reply]
    return dict(zip(items[::2], items[1::2], strict=False))


class SentinelServer(OnePort, ChildServer):
    """``redis-server sentinel.conf --sentinel`` monitoring one master with quorum 1."""

    host: str = LOOPBACK

    def __init__(
        self,
        master_port: int,
        *,
        name: str = MASTER_NAME,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 10000,
        start_timeout: float = 60.0,
    ) -> None:
        self.name = name
        self.master_port = master_port
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self._start_timeout = start_timeout
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None

    @property
    def log_path(self) -> Path:
        return self.tmpdir / "sentinel.log"

    def start(self) -> SentinelServer:
        """Start Sentinel and wait until it names the master."""
        if self.running:
            return self
        binary = require_binary("redis-server", "redis-server")
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="sentinel-test-"))
        _register(self)
        conf = self.tmpdir / "sentinel.conf"  # Sentinel rewrites it: it must be its own, writable file
        conf.write_text(
            f"port {self.port}\nbind {self.host}\ndir {self.tmpdir}\nlogfile {self.log_path}\n"
            f"sentinel monitor {self.name} {LOOPBACK} {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}\n"
        )
        self._proc = start_process([binary, str(conf), "--sentinel"], cwd=self.tmpdir, output=self.tmpdir / "stdout")
        try:
            wait_until(
                lambda: self.master_port_now() == self.master_port,
                timeout=self._start_timeout,
                what=f"sentinel on port {self.port} naming the master",
                proc=self._proc,
                log_files=[self.log_path, self.tmpdir / "stdout"],
            )
        except BaseException:
            self.stop()
            raise
        return self

    def command(self, *args: str | int, timeout: float = 5.0) -> RespValue:
        return resp_command(self.host, self.port, *args, timeout=timeout)

    def master_port_now(self) -> int | None:
        """The master's port as Sentinel names it now (``SENTINEL get-master-addr-by-name``); None if no answer."""
        try:
            reply = self.command("SENTINEL", "get-master-addr-by-name", self.name, timeout=2.0)
        except (OSError, RedisError):
            return None
        if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], bytes):
            return int(reply[1])
        return None

    def master_state(self) -> dict[str, str]:
        """``SENTINEL MASTER``: flags, failover state, replica count..."""
        return _pairs(self.command("SENTINEL", "MASTER", self.name))

    def replicas(self) -> list[dict[str, str]]:
        """``SENTINEL REPLICAS``: each replica Sentinel knows, with its flags and master-link-status."""
        reply = self.command("SENTINEL", "REPLICAS", self.name)
        return [_pairs(item) for item in reply] if isinstance(reply, list) else []


class LinkRelay:
    """The network between a replica and its master, as a TCP relay on a free loopback port: ``hold()`` keeps
    what the master sends (as a slow or congested link does, the replica falls behind while the master goes on
    acknowledging writes), ``release()`` lets it through, ``cut()`` drops the connections and whatever was held
    (what a crashed machine had not sent yet). The replica's own traffic to the master always passes."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._holding = False
        self._held: dict[socket.socket, list[bytes]] = {}
        self._sockets: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name=f"relay-{self.port}", daemon=True).start()

    def hold(self) -> None:
        with self._lock:
            self._holding = True

    def release(self) -> None:
        with self._lock:
            self._holding = False
            held, self._held = self._held, {}
        for downstream, chunks in held.items():
            with contextlib.suppress(OSError):
                downstream.sendall(b"".join(chunks))

    def cut(self) -> None:
        """Close every relayed connection, dropping what was held; new connections are still relayed."""
        with self._lock:
            self._holding = False
            self._held = {}
            sockets, self._sockets = self._sockets, set()
        for each in sockets:
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
            each.close()

    def close(self) -> None:
        self._closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=5)
            except OSError:
                downstream.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {downstream, upstream}
            threading.Thread(target=self._pump, args=(downstream, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_master: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                with self._lock:
                    if source not in self._sockets:
                        return  # cut: what was read is dropped
                    if from_master and self._holding:
                        self._held.setdefault(sink, []).append(data)
                        continue
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _replicates_from(replica: RedisServer, master: RedisServer, via: int | None = None) -> bool:
    """The replica follows `master` (directly or through port `via`) with its link up, and the master counts it
    online."""
    try:
        mine, theirs = replica.info(), master.info()
    except (OSError, RedisError):
        return False
    return (
        mine.get("role") == "slave"
        and mine.get("master_port") in (str(master.port), str(via))
        and mine.get("master_link_status") == "up"
        and theirs.get("role") == "master"
        and any(f"port={replica.port}," in value and "state=online" in value for value in theirs.values())
    )


def wait_replicating(replica: RedisServer, master: RedisServer, *, via: int | None = None, timeout: float = 60) -> None:
    """Until `replica` follows `master` (directly or through port `via`) with its link up, and the master counts
    it online (INFO replication on both)."""
    wait_until(
        lambda: _replicates_from(replica, master, via),
        timeout=timeout,
        what=f"redis {replica.port} replicating from {master.port}",
        log_files=[replica.log_path, master.log_path],
        interval=0.05,
    )


class SentinelGroup:
    """``RedisServer`` nodes (a master and ``replicas`` replicas, one by default) and a ``SentinelServer``
    (quorum 1); ``stop()`` ends them all, and so do the context manager and interpreter exit.

    ``relayed=True`` puts a ``LinkRelay`` (``link``) between the first replica and the master, to make the
    replica fall behind on purpose. Sentinel "fixes" a replica that follows another address than the master's
    after ``failover_timeout_ms``, so that is a minute then."""

    def __init__(
        self,
        *,
        replicas: int = 1,
        down_after_ms: int = 1000,
        failover_timeout_ms: int | None = None,
        relayed: bool = False,
        timeout: float = 60.0,
    ) -> None:
        self.replica_count = replicas
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms or (60000 if relayed else 10000)
        self.relayed = relayed
        self.timeout = timeout
        self.nodes: list[RedisServer] = []
        self.sentinel: SentinelServer | None = None
        self.link: LinkRelay | None = None

    # -- for the gateway's configuration -------------------------------------

    @property
    def url(self) -> str:
        """The client's URL: the host is the master's name, Sentinel says where it is."""
        return f"redis://{MASTER_NAME}/0"

    @property
    def sentinels(self) -> list[dict[str, Any]]:
        return [{"host": LOOPBACK, "port": self._sentinel.port}]

    # -- life cycle ----------------------------------------------------------

    def start(self) -> Self:
        try:
            first = RedisServer(extra_config=NODE_CONFIG).start()
            self.nodes.append(first)
            if self.relayed:
                self.link = LinkRelay(first.port)
            for index in range(self.replica_count):
                upstream = self.link.port if self.link and index == 0 else first.port
                replica = RedisServer(extra_config={**NODE_CONFIG, "replicaof": f"{LOOPBACK} {upstream}"}).start()
                self.nodes.append(replica)
                self.wait_replicating(replica, first)
            self.sentinel = SentinelServer(
                first.port, down_after_ms=self.down_after_ms, failover_timeout_ms=self.failover_timeout_ms
            ).start()
            for replica in self.nodes[1:]:
                self.wait_sentinel_ready(first, replica)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.sentinel is not None:
            self.sentinel.stop()
        if self.link is not None:
            self.link.close()
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- who is who ----------------------------------------------------------

    @property
    def _sentinel(self) -> SentinelServer:
        if self.sentinel is None:
            raise RuntimeError("SentinelGroup is not started")
        return self.sentinel

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def master(self) -> RedisServer:
        """The node Sentinel names as master now."""
        port = self._sentinel.master_port_now()
        if port is None:
            raise RuntimeError("sentinel does not answer")
        return self.node(port)

    def other(self, node: RedisServer) -> RedisServer:
        """The first node that is not `node` (with one replica: the other one)."""
        return next(each for each in self.nodes if each is not node)

    # -- waiting on events ---------------------------------------------------

    def _wait(self, predicate: Any, what: str) -> None:
        sentinel = self._sentinel
        wait_until(
            predicate,
            timeout=self.timeout,
            what=what,
            log_files=[sentinel.log_path, *(node.log_path for node in self.nodes if node.running)],
            interval=0.05,
        )

    def wait_replicating(self, replica: RedisServer, master: RedisServer) -> None:
        """Until `replica` follows `master` with its link up (INFO replication on both)."""
        relayed = self.link is not None and self.link.target_port == master.port and replica is self.nodes[1]
        wait_replicating(replica, master, via=self.link.port if relayed and self.link else None, timeout=self.timeout)

    def wait_sentinel_ready(self, master: RedisServer, replica: RedisServer) -> None:
        """Until Sentinel names `master` and knows `replica` as a healthy replica of it, so that a failover can
        pick it (SENTINEL FAILOVER answers NOGOODSLAVE otherwise)."""

        via = str(self.link.port) if self.link and self.link.target_port == master.port else None

        def ready() -> bool:
            sentinel = self._sentinel
            if sentinel.master_port_now() != master.port:
                return False
            try:
                state = sentinel.master_state()
                replicas = sentinel.replicas()
            except (OSError, RedisError):
                return False
            return "failover_in_progress" not in state.get("flags", "") and any(
                item.get("port") == str(replica.port)
                and item.get("flags") == "slave"
                and item.get("master-link-status") == "ok"
                and item.get("master-port") in (str(master.port), via)
                for item in replicas
            )

        self._wait(ready, f"sentinel ready to fail {master.port} over to {replica.port}")

    def wait_promoted(self, old: RedisServer) -> RedisServer:
        """Until Sentinel names another node than `old`, and that node says it is a master; returns it."""

        def promoted() -> bool:
            port = self._sentinel.master_port_now()
            if port is None or port == old.port:
                return False
            try:
                return self.node(port).info().get("role") == "master"
            except (OSError, RedisError):
                return False

        self._wait(promoted, f"sentinel promoting a replica of {old.port}")
        return self.master()

    # -- failovers -----------------------------------------------------------

    def failover(self) -> RedisServer:
        """``SENTINEL FAILOVER``: Sentinel promotes the replica at once and later turns the old master into its
        replica. Returns the new master as soon as Sentinel names it (the old one may still take writes)."""
        old = self.master()
        reply = self._sentinel.command("SENTINEL", "FAILOVER", MASTER_NAME)
        if reply != b"OK":
            raise RedisError(f"SENTINEL FAILOVER answered {reply!r}")
        return self.wait_promoted(old)

    def crash_master(self) -> RedisServer:
        """SIGKILL the master (and cut the relayed link with it); returns the replica Sentinel promotes after
        down-after-milliseconds."""
        old = self.master()
        if self.link is not None:
            self.link.cut()
        old.crash()
        return self.wait_promoted(old)

    def wait_settled(self) -> RedisServer:
        """Until the group is whole again: the master Sentinel names has every other running node as its
        replica, link up, and Sentinel could fail over once more. Returns the master."""
        master = self.master()
        for replica in self.nodes:
            if replica is not master and replica.running:
                self.wait_replicating(replica, master)
                self.wait_sentinel_ready(master, replica)
        return master

    def revive(self, node: RedisServer) -> None:
        """Start a crashed node again as a replica of the current master (as an operator, or Sentinel itself,
        would make it), empty, and wait until it has caught up."""
        master = self.master()
        node.configure(replicaof=f"{LOOPBACK} {master.port}")
        node.start()
        self.wait_replicating(node, master)
