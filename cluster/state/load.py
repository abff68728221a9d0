"""Per-worker load reports, published by workers and read by routers in one round trip."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from cluster.state.base import DEFAULT_TTL_S, StoreBase, known_fields, ttl_ms


@dataclass(frozen=True)
class LoadReport:
    """A worker's figures at one heartbeat. Counters (`prefix_cache_*`, `kv_transfer_*`) are totals
    since the worker started, as Prometheus counters are; routers expose them in /metrics."""

    num_running: int
    num_waiting: int
    num_waiting_for_kv: int
    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float  # 0..1, fraction of KV blocks in use
    prefix_cache_hits: int = 0  # prompt tokens found in the prefix cache
    prefix_cache_queries: int = 0  # prompt tokens looked up
    kv_transfer_bytes: int = 0  # KV bytes received from prefill workers
    kv_transfer_fallbacks: int = 0  # transfers that failed and were recomputed here
    max_num_seqs: int = 0  # sequences it runs at once at most (0: no limit)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str) -> LoadReport:
        return cls(**known_fields(cls, json.loads(data)))


class LoadMixin(StoreBase):
    def publish_load(self, worker_id: str, report: LoadReport, ttl_s: float = DEFAULT_TTL_S) -> None:
        # TTL'd so a dead worker's last report cannot keep attracting (or repelling) traffic.
        self.r.set(self.keys.load(worker_id), report.to_json(), px=ttl_ms(ttl_s))

    def get_loads(self, worker_ids: Sequence[str]) -> dict[str, LoadReport]:
        """Latest report per worker (one MGET); workers without a live report are left out."""
        if not worker_ids:
            return {}
        records = self.r.mget([self.keys.load(w) for w in worker_ids])
        return {w: LoadReport.from_json(rec) for w, rec in zip(worker_ids, records, strict=True) if rec is not None}
