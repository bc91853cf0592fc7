"""Arbitration between several collectors watching one mailbox, in Redis.

Each message is claimed before it is fetched: ``SET key owner NX PX lease``. The key names the mailbox, its
UIDVALIDITY and the UID (or the Graph message id), unlike mail_room's bare ``delivered:<uid>``. Once the message
is in a journal the key becomes ``done`` for the journal's retention, so another collector that finds it still
unread settles it without taking it again. A collector that dies holding a claim loses it when the lease ends,
and the message, still unread on the server, is taken by whoever comes next.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Protocol

from redis import asyncio as aioredis

PREFIX = "lmtp-gateway:collect:"
LEASE_MS = 10 * 60 * 1000
DONE = "done"

# KEYS: the messages; ARGV: owner, lease (ms). Per key: 1 = ours now, 2 = done by someone, 0 = held by another.
_CLAIM = """
local answers = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder == false then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    answers[i] = 1
  elseif holder == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    answers[i] = 1
  elseif holder == 'done' then
    answers[i] = 2
  else
    answers[i] = 0
  end
end
return answers
"""


_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""


class Claim(Enum):
    MINE = 1
    DONE = 2  # in another collector's journal: settle it, do not take it
    BUSY = 0  # another collector is on it


class Arbiter(Protocol):
    async def claim(self, keys: Sequence[str]) -> list[Claim]: ...

    async def finish(self, keys: Sequence[str]) -> None: ...

    async def release(self, keys: Sequence[str]) -> None: ...


class SoleCollector:
    """No arbitration: this collector is the only one on its mailboxes."""

    async def claim(self, keys: Sequence[str]) -> list[Claim]:
        return [Claim.MINE] * len(keys)

    async def finish(self, keys: Sequence[str]) -> None:
        pass

    async def release(self, keys: Sequence[str]) -> None:
        pass


def owner_id(state_dir: Path) -> str:
    """This installation's name in the claims, kept beside its journal: restarted after a crash, a collector
    takes back its own claims at once instead of waiting for their leases to end."""
    path = state_dir / "owner-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        state_dir.mkdir(parents=True, exist_ok=True)
        owner = uuid.uuid4().hex
        path.write_text(owner + "\n")
        return owner


class RedisArbiter:
    def __init__(self, redis: aioredis.Redis, owner: str, *, done_seconds: int, lease_ms: int = LEASE_MS) -> None:
        self.redis = redis
        self.owner = owner
        self.done_seconds = done_seconds
        self.lease_ms = lease_ms
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)

    async def claim(self, keys: Sequence[str]) -> list[Claim]:
        if not keys:
            return []
        answers = await self._claim(keys=[PREFIX + key for key in keys], args=[self.owner, self.lease_ms])
        return [Claim(int(answer)) for answer in answers]

    async def finish(self, keys: Sequence[str]) -> None:
        if keys:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(PREFIX + key, DONE, ex=self.done_seconds)
                await pipe.execute()

    async def release(self, keys: Sequence[str]) -> None:
        """Give back claims on messages not taken after all (ours only: a lease may have passed to another)."""
        if keys:
            await self._release(keys=[PREFIX + key for key in keys], args=[self.owner])
