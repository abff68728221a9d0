"""The actuator seam: how a decision becomes replicas. `RayActuator` (ray_actuator.py) is the real one;
`FakeActuator` here lets the controller run in unit tests without a cluster.

`scale(model, pool, n)` returns at once: replicas are added, and removed (drained first), in the
background, and calling it again with the same `n` while that happens changes nothing. The count
it converges to is the replicas the actuator manages for that pool; `num_replicas` says how many it
has now, starting ones included, draining ones not.
"""

from __future__ import annotations

import threading
from typing import Protocol

from cluster.state.registry import WorkerInfo
from cluster.state.store import StateStore


class Actuator(Protocol):
    def scale(self, model: str, pool: str, num_replicas: int) -> None: ...

    def num_replicas(self, model: str, pool: str) -> int: ...

    def close(self) -> None: ...


class FakeActuator:
    """Keeps a count per pool and a log of calls. With a store, each replica is also a registry record
    (no process behind it), so a controller reading signals from Redis sees its own decisions land."""

    def __init__(self, store: StateStore | None = None, ttl_s: float = 600.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.calls: list[tuple[str, str, int]] = []  # every scale() call, in order
        self._ids: dict[tuple[str, str], list[str]] = {}
        self._next = 0
        self._lock = threading.Lock()

    def scale(self, model: str, pool: str, num_replicas: int) -> None:
        if num_replicas < 0:
            raise ValueError(f"num_replicas must be >= 0, got {num_replicas}")
        with self._lock:
            self.calls.append((model, pool, num_replicas))
            ids = self._ids.setdefault((model, pool), [])
            while len(ids) < num_replicas:
                self._next += 1
                worker_id = f"fake-{model}-{pool}-{self._next}"
                ids.append(worker_id)
                if self.store is not None:
                    self.store.register(WorkerInfo(worker_id, model, pool, f"127.0.0.1:{self._next}"), self.ttl_s)
            while len(ids) > num_replicas:
                worker_id = ids.pop()
                if self.store is not None:
                    self.store.deregister(worker_id)

    def num_replicas(self, model: str, pool: str) -> int:
        with self._lock:
            return len(self._ids.get((model, pool), []))

    def worker_ids(self, model: str, pool: str) -> list[str]:
        with self._lock:
            return list(self._ids.get((model, pool), []))

    def close(self) -> None:
        pass
