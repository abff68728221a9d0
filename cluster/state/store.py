"""StateStore: the one object routers, workers and the autoscaler use for shared cluster state."""

from __future__ import annotations

import os

import redis

from cluster.state.keys import DEFAULT_PREFIX, Keys, glob_escape
from cluster.state.load import LoadMixin
from cluster.state.lock import LockMixin
from cluster.state.prefix_index import PrefixIndexMixin
from cluster.state.queue_depth import QueueDepthMixin
from cluster.state.ratelimit import RateLimitMixin
from cluster.state.registry import RegistryMixin
from cluster.state.server import EmbeddedRedis, connect, start_embedded_redis


class StateStore(RegistryMixin, LoadMixin, PrefixIndexMixin, QueueDepthMixin, RateLimitMixin, LockMixin):
    """Registry, loads, prefix index, queue depths, rate limits and locks over one Redis client.

    Synchronous and thread-safe (redis-py's pool); asyncio callers run it in a thread.
    """

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.r = client
        self.keys = Keys(prefix)
        self._scripts = {}

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX, timeout_s: float | None = None) -> StateStore:
        """`timeout_s`: see `connect` (callers that must notice an unreachable Redis promptly)."""
        return cls(connect(url, timeout_s=timeout_s), prefix)

    def clear(self) -> int:
        """Delete every key under this store's prefix (tests, `pdserve down`); returns how many."""
        n = 0
        batch: list[str] = []
        for key in self.r.scan_iter(match=glob_escape(self.keys.prefix) + "*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                n += self.r.delete(*batch)
                batch.clear()
        if batch:
            n += self.r.delete(*batch)
        return n

    def close(self) -> None:
        self.r.close()


def open_store(url: str | None = None, directory: str | os.PathLike[str] | None = None,
               prefix: str = DEFAULT_PREFIX) -> tuple[StateStore, EmbeddedRedis | None]:
    """Connect to `url`, or with no URL start an embedded server (in `directory`, else a temp dir
    removed on close).

    The caller owns the returned EmbeddedRedis (None when `url` was given) and must close it.
    """
    if url:
        return StateStore.from_url(url, prefix), None
    server = start_embedded_redis(directory)
    return StateStore.from_url(server.url, prefix), server
