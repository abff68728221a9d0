"""Signals per (model, pool), read from Redis: what `decide` looks at.

Per pool: its live workers (the registry; a draining worker has already left it), their load
reports summed (running, waiting inside the worker) and averaged (KV usage, max_num_seqs as the
replica capacity), and the routers' admission queues. A router's queue is per model, and it fills
when the model's in-flight cap is reached — by default the sum of its decode (else unified)
workers' max_num_seqs — so the queue counts for the decode or unified pool only; a prefill pool's
backlog is the prompts waiting inside its workers. Requests waiting for their KV on a decode worker
are waiting on the prefill pool, so they count for neither.

Arrival rate and TTFT / ITL percentiles come from what routers record through traffic.py (None
until a router records them).
"""

from __future__ import annotations

from collections.abc import Iterable

from cluster.autoscale.decide import PoolSignals
from cluster.autoscale.traffic import read_traffic
from cluster.state.store import StateStore

ROUTER_QUEUE_POOLS = ("decode", "unified")  # the pools whose capacity caps a router's admission


def read_signals(store: StateStore, pools: Iterable[tuple[str, str]], window_s: float = 30.0,
                 now: float | None = None) -> dict[tuple[str, str], PoolSignals]:
    """Signals of every (model, pool) asked for, with one registry read and one load read."""
    wanted = list(dict.fromkeys(pools))
    keys = set(wanted)
    workers = [w for w in store.list_workers() if (w.model, w.role) in keys]
    loads = store.get_loads([w.worker_id for w in workers])
    traffic = {model: read_traffic(store, model, window_s, now) for model in {m for m, _ in wanted}}
    out: dict[tuple[str, str], PoolSignals] = {}
    for model, pool in wanted:
        ids = [w.worker_id for w in workers if (w.model, w.role) == (model, pool)]
        reports = [loads[i] for i in ids if i in loads]
        capacities = [r.max_num_seqs for r in reports if r.max_num_seqs > 0]
        t = traffic[model]
        out[(model, pool)] = PoolSignals(
            model=model, pool=pool, num_replicas=len(ids),
            num_running=sum(r.num_running for r in reports),
            num_waiting=sum(r.num_waiting for r in reports),
            router_queue=store.queue_depth(model, pool) if pool in ROUTER_QUEUE_POOLS else 0,
            kv_usage=sum(r.kv_usage for r in reports) / len(reports) if reports else 0.0,
            replica_capacity=round(sum(capacities) / len(capacities)) if capacities else 0,
            arrival_rate=t.arrival_rate, ttft_p95_s=t.ttft_p95_s, itl_p95_s=t.itl_p95_s,
        )
    return out
