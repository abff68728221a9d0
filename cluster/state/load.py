"""Per-worker load reports, published by workers and read by routers in one round trip."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from cluster.state.base import DEFAULT_TTL_S, StoreBase, ttl_ms


@dataclass(frozen=True)
class LoadReport:
    num_running: int
    num_waiting: int
    num_waiting_for_kv: int
    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float  # 0..1, fraction of KV blocks in use

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str) -> LoadReport:
        return cls(**json.loads(data))


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
