"""Worker registry: who serves which model in which role, alive while it keeps heartbeating.

A worker's JSON record lives under a key whose TTL *is* its liveness: a worker that stops
heartbeating drops out of `list_workers` once the TTL runs out, with no reaper process. Its load
report and prefix-index entries share the same lifetime (heartbeat extends all three).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

from cluster.state.base import DEFAULT_TTL_S, StoreBase, known_fields, ttl_ms

Role = Literal["prefill", "decode", "unified", "simulated"]
ROLES: tuple[str, ...] = get_args(Role)


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    model: str
    role: Role
    address: str  # "host:port" of the worker's gRPC server
    tp: int = 1
    started_at: float = field(default_factory=time.time)
    # Tokens per KV block: a router hashes prompts with it (cluster.kv.hashing.prompt_block_hashes)
    # to look them up in this worker's prefix-index entries.
    block_size: int = 16

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must be non-empty")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address must be 'host:port', got {self.address!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str) -> WorkerInfo:
        return cls(**known_fields(cls, json.loads(data)))


class RegistryMixin(StoreBase):
    def register(self, worker: WorkerInfo, ttl_s: float = DEFAULT_TTL_S) -> None:
        """Add (or re-add) a worker. A (re)start has an empty KV cache and no load yet, so the old
        prefix-index entries and load report under this id are dropped."""
        k = self.keys
        with self.r.pipeline(transaction=True) as p:
            p.set(k.worker(worker.worker_id), worker.to_json(), px=ttl_ms(ttl_s))
            p.sadd(k.workers, worker.worker_id)
            p.delete(k.load(worker.worker_id), k.blocks(worker.worker_id))
            p.execute()

    def heartbeat(self, worker_id: str, ttl_s: float = DEFAULT_TTL_S) -> bool:
        """Extend the worker's life by `ttl_s`. False: it had already expired (or was never
        registered) and must `register` again."""
        k, ms = self.keys, ttl_ms(ttl_s)
        with self.r.pipeline(transaction=True) as p:
            p.pexpire(k.worker(worker_id), ms)
            p.pexpire(k.load(worker_id), ms)
            p.pexpire(k.blocks(worker_id), ms)
            alive, _, _ = p.execute()
        return bool(alive)

    def deregister(self, worker_id: str) -> None:
        k = self.keys
        with self.r.pipeline(transaction=True) as p:
            p.delete(k.worker(worker_id), k.load(worker_id), k.blocks(worker_id))
            p.srem(k.workers, worker_id)
            p.execute()

    def get_worker(self, worker_id: str) -> WorkerInfo | None:
        data = self.r.get(self.keys.worker(worker_id))
        return WorkerInfo.from_json(data) if data is not None else None

    def list_workers(self, model: str | None = None, role: str | None = None) -> list[WorkerInfo]:
        """Live workers, optionally filtered, sorted by worker_id (stable order for routing)."""
        ids = sorted(self.r.smembers(self.keys.workers))
        if not ids:
            return []
        records = self.r.mget([self.keys.worker(w) for w in ids])
        dead = [w for w, rec in zip(ids, records, strict=True) if rec is None]
        if dead:
            # Lazy pruning of the id set; a worker re-registering meanwhile re-adds itself.
            self.r.srem(self.keys.workers, *dead)
        workers = [WorkerInfo.from_json(rec) for rec in records if rec is not None]
        return [w for w in workers if (model is None or w.model == model) and (role is None or w.role == role)]

    def models(self) -> list[str]:
        """Models served by at least one live worker."""
        return sorted({w.model for w in self.list_workers()})
