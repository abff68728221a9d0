"""Queue depth per (model, pool), reported by each router replica and summed for the autoscaler.

Each router writes its own TTL'd key, so a router that dies stops counting once its report expires;
a set of router ids per (model, pool) avoids SCAN when summing.
"""

from __future__ import annotations

from cluster.state.base import DEFAULT_TTL_S, StoreBase, ttl_ms


class QueueDepthMixin(StoreBase):
    def set_queue_depth(self, model: str, pool: str, router_id: str, depth: int,
                        ttl_s: float = DEFAULT_TTL_S) -> None:
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        k, ms = self.keys, ttl_ms(ttl_s)
        with self.r.pipeline(transaction=True) as p:
            p.set(k.queue_depth(model, pool, router_id), int(depth), px=ms)
            p.sadd(k.queue_routers(model, pool), router_id)
            # The id set outlives each report by a little and vanishes once every router is gone.
            p.pexpire(k.queue_routers(model, pool), 2 * ms)
            p.execute()

    def queue_depths(self, model: str, pool: str) -> dict[str, int]:
        """Live per-router depths for (model, pool)."""
        k = self.keys
        routers = sorted(self.r.smembers(k.queue_routers(model, pool)))
        if not routers:
            return {}
        values = self.r.mget([k.queue_depth(model, pool, rid) for rid in routers])
        stale = [rid for rid, v in zip(routers, values, strict=True) if v is None]
        if stale:
            self.r.srem(k.queue_routers(model, pool), *stale)
        return {rid: int(v) for rid, v in zip(routers, values, strict=True) if v is not None}

    def queue_pools(self) -> list[tuple[str, str]]:
        """(model, pool) pairs with a router-id set, found by SCAN: for `pdserve status` and tools,
        not for a request path. Pools whose routers are all gone drop out with the set's expiry."""
        pairs = {self.keys.parse_queue_routers(key) for key in self.r.scan_iter(match=self.keys.queue_routers_glob,
                                                                                 count=500)}
        return sorted(p for p in pairs if p is not None)

    def queue_depth(self, model: str, pool: str) -> int:
        """Sum over router replicas whose reports have not expired."""
        return sum(self.queue_depths(model, pool).values())
