"""Redis key names, all under one prefix so several clusters can share a Redis.

Components are escaped (':' and '%' percent-encoded) so a model named "a:b" can never produce the
same key as model "a" with pool "b".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

DEFAULT_PREFIX = "pdserve:"


def _part(s: str) -> str:
    return s.replace("%", "%25").replace(":", "%3A")


def _unpart(s: str) -> str:
    return s.replace("%3A", ":").replace("%25", "%")


def glob_escape(s: str) -> str:
    """`s` as a literal in a SCAN/KEYS MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(_part(p) for p in parts)

    @property
    def workers(self) -> str:
        """Set of worker ids ever registered (pruned lazily when their info key has expired)."""
        return self.prefix + "workers"

    def worker(self, worker_id: str) -> str:
        """JSON WorkerInfo; its TTL is the worker's liveness."""
        return self._k("worker", worker_id)

    def load(self, worker_id: str) -> str:
        return self._k("load", worker_id)

    def blocks(self, worker_id: str) -> str:
        """Set of the block hashes (raw bytes) cached on one worker."""
        return self._k("blocks", worker_id)

    def queue_routers(self, model: str, pool: str) -> str:
        """Set of router ids that reported a queue depth for (model, pool)."""
        return self._k("qrouters", model, pool)

    @property
    def queue_routers_glob(self) -> str:
        """MATCH pattern for every (model, pool)'s router-id set."""
        return glob_escape(self.prefix + "qrouters:") + "*"

    def parse_queue_routers(self, key: str) -> tuple[str, str] | None:
        """(model, pool) of a `queue_routers` key; None for any other key."""
        head = self.prefix + "qrouters:"
        parts = key[len(head):].split(":") if key.startswith(head) else []
        return (_unpart(parts[0]), _unpart(parts[1])) if len(parts) == 2 else None

    def queue_depth(self, model: str, pool: str, router_id: str) -> str:
        return self._k("qdepth", model, pool, router_id)

    def rate(self, api_key: str) -> str:
        # Hashed: an API key is a secret, and key names show up in MONITOR, SCAN and dumps.
        return self._k("rate", hashlib.sha256(api_key.encode()).hexdigest())

    def lock(self, name: str) -> str:
        return self._k("lock", name)
