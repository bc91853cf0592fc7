"""A real Sidekiq server (Debian's ruby-sidekiq) running workers named as GitLab's, on a test Redis.

The workers (tests/sidekiq/gitlab_workers.rb) read each job's message with the mail gem, as GitLab does, and write
what a reader sees to a JSON-lines file: what the gateway hands GitLab is then checked by GitLab's own tools.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from . import ChildServer, _register, require_binary, start_process, wait_until
from .redis import RedisServer

WORKERS = Path(__file__).resolve().parent.parent / "sidekiq" / "gitlab_workers.rb"


class SidekiqServer(ChildServer):
    def __init__(self, redis: RedisServer, *, queue: str = "default", start_timeout: float = 60.0) -> None:
        self.redis = redis
        self.queue = queue
        self.start_timeout = start_timeout

    @property
    def received_log(self) -> Path:
        return self.tmpdir / "received.jsonl"

    @property
    def log_path(self) -> Path:
        return self.tmpdir / "sidekiq.log"

    def start(self) -> SidekiqServer:
        binary = require_binary("sidekiq", "ruby-sidekiq")
        self._tmpdir = Path(tempfile.mkdtemp(prefix="sidekiq-test-"))
        _register(self)
        env = {**os.environ, "REDIS_URL": self.redis.url, "RECEIVED_LOG": str(self.received_log),
               "QUIET_MAIL_WARNINGS": "1"}  # fmt: skip
        argv = [binary, "-r", str(WORKERS), "-q", self.queue, "-c", "2", "-t", "5"]
        self._proc = start_process(argv, cwd=self._tmpdir, output=self.log_path, env=env)
        wait_until(  # a running Sidekiq registers itself in Redis with its first heartbeat
            lambda: bool(self.redis.command("SMEMBERS", "processes")),
            timeout=self.start_timeout,
            what="sidekiq",
            proc=self._proc,
            log_files=[self.log_path],
        )
        return self

    def received(self) -> list[dict[str, Any]]:
        """What the workers saw, one entry per job performed."""
        if not self.received_log.exists():
            return []
        return [json.loads(line) for line in self.received_log.read_text().splitlines()]
