"""`pdserve status`: pools, workers, queue depths and KV usage, as the cluster's Redis has them.

    pdserve status                          # Redis from ./.pdserve/up.json
    pdserve status --redis-url unix:///tmp/pdserve-redis/redis.sock --json

Which Redis: `--redis-url`, else the `redis_url` key of `.pdserve/up.json` in the current directory.
`pdserve up` writes that file while it runs (it may start an embedded Redis on a unix socket whose path
nobody could guess), so `pdserve status` from the same directory finds the running cluster.

What it shows, per model and pool (prefill / decode / unified / simulated, plus any pool a router
reports a queue for): the pool's queue depth summed over live routers, and each live worker's id,
address, TP size, running and waiting requests, KV-cache usage and the blocks it has in the prefix
index; then the autoscaler's newest decision events, if it has made any. Everything comes from Redis
(registry, load reports, prefix index, queue depths, autoscaler events), so it shows what routers
see, a heartbeat old at most; no worker is called.

`collect_status` reads Redis; `render_status` and `status_to_dict` are pure, for tests.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.autoscale.events import Event, read_events
from cluster.state.load import LoadReport
from cluster.state.registry import ROLES
from cluster.state.store import StateStore

UP_FILE = Path(".pdserve") / "up.json"
_TIMEOUT_S = 5.0
AUTOSCALER_EVENTS = 10  # the newest autoscaler decisions shown


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    address: str
    tp: int
    block_size: int
    started_at: float
    load: LoadReport | None  # None: registered, no load report yet (or it expired)
    num_cached_blocks: int  # blocks in the prefix index


@dataclass(frozen=True)
class PoolStatus:
    model: str
    pool: str
    queue_depth: int
    workers: list[WorkerRow] = field(default_factory=list)


@dataclass(frozen=True)
class ClusterStatus:
    redis_url: str
    pools: list[PoolStatus]  # by model, then pool in ROLES order
    autoscaler_events: list[Event] = field(default_factory=list)  # newest first (cluster/autoscale/events.py)

    @property
    def num_workers(self) -> int:
        return sum(len(p.workers) for p in self.pools)

    @property
    def models(self) -> list[str]:
        return sorted({p.model for p in self.pools})


def resolve_redis_url(url: str | None, cwd: Path | None = None) -> str:
    """`url`, else `redis_url` from `.pdserve/up.json` under `cwd`; ValueError saying what is missing."""
    if url:
        return url
    path = (cwd or Path.cwd()) / UP_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no --redis-url given and no {UP_FILE} here (is `pdserve up` running in this "
                         "directory?)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it ({exc})") from None
    found = record.get("redis_url") if isinstance(record, dict) else None
    if not isinstance(found, str) or not found:
        raise ValueError(f"{path}: redis_url must be a non-empty string")
    return found


def collect_status(store: StateStore, redis_url: str = "") -> ClusterStatus:
    workers = store.list_workers()
    ids = [w.worker_id for w in workers]
    loads = store.get_loads(ids)
    cached = store.num_blocks_by_worker(ids)
    by_pool: dict[tuple[str, str], list[WorkerRow]] = {}
    for w in workers:
        row = WorkerRow(w.worker_id, w.address, w.tp, w.block_size, w.started_at, loads.get(w.worker_id),
                        cached.get(w.worker_id, 0))
        by_pool.setdefault((w.model, w.role), []).append(row)
    for key in store.queue_pools():
        by_pool.setdefault(key, [])
    pools = [PoolStatus(model, pool, store.queue_depth(model, pool), rows)
             for (model, pool), rows in sorted(by_pool.items(), key=lambda kv: _pool_order(*kv[0]))]
    return ClusterStatus(redis_url, pools, read_events(store, limit=AUTOSCALER_EVENTS))


def _pool_order(model: str, pool: str) -> tuple:
    return (model, ROLES.index(pool) if pool in ROLES else len(ROLES), pool)


def status_to_dict(status: ClusterStatus) -> dict:
    models: dict[str, list[dict]] = {}
    for p in status.pools:
        models.setdefault(p.model, []).append({
            "pool": p.pool, "queue_depth": p.queue_depth, "num_workers": len(p.workers),
            "workers": [asdict(w) for w in p.workers],
        })
    return {"redis_url": status.redis_url, "num_workers": status.num_workers,
            "models": [{"model": m, "pools": pools} for m, pools in models.items()],
            "autoscaler_events": [asdict(e) for e in status.autoscaler_events]}


_COLUMNS = ("WORKER", "ADDRESS", "TP", "RUNNING", "WAITING", "KV USED", "BLOCKS USED", "CACHED")


def render_status(status: ClusterStatus) -> str:
    """A readable table per pool, grouped by model."""
    n, m = status.num_workers, len(status.models)
    lines = [f"Redis {status.redis_url or '?'}: {n} live worker{'s' * (n != 1)}, {m} model{'s' * (m != 1)}"]
    if not status.pools:
        lines.append("no live workers and no queued requests")
        return "\n".join(lines) + "\n"
    model = None
    for p in status.pools:
        if p.model != model:
            model = p.model
            lines += ["", f"model {model}"]
        k = len(p.workers)
        lines.append(f"  pool {p.pool}: {k} worker{'s' * (k != 1)}, queue depth {p.queue_depth}")
        if p.workers:
            lines += ["    " + line for line in _table([_COLUMNS, *(_row(w) for w in p.workers)])]
    lines += _events(status.autoscaler_events)
    return "\n".join(lines) + "\n"


def _events(events: list[Event]) -> list[str]:
    if not events:
        return []
    lines = ["", "autoscaler events (newest first)"]
    for e in events:
        when = time.strftime("%H:%M:%S", time.localtime(e.at))
        change = f"{e.current} -> {e.desired}" if e.desired != e.current else f"at {e.desired}"
        lines.append(f"  {when}  {e.model}/{e.pool}  {e.direction} {change}  {e.reason}: {e.message}")
    return lines


def _row(w: WorkerRow) -> tuple[str, ...]:
    if w.load is None:
        figures = ("-",) * 4
    else:
        num_used = w.load.num_total_blocks - w.load.num_free_blocks
        figures = (str(w.load.num_running), str(w.load.num_waiting + w.load.num_waiting_for_kv),
                   f"{100 * w.load.kv_usage:.1f}%", f"{num_used}/{w.load.num_total_blocks}")
    return (w.worker_id, w.address, str(w.tp), *figures, str(w.num_cached_blocks))


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    # Names left-aligned, figures right-aligned.
    return ["  ".join(c.ljust(wd) if i < 2 else c.rjust(wd) for i, (c, wd) in enumerate(zip(r, widths, strict=True)))
            .rstrip() for r in rows]


def run_status(redis_url: str | None, as_json: bool = False, cwd: Path | None = None) -> int:
    """The CLI: 0 printed, 2 no Redis named, 1 Redis unreachable."""
    import redis

    try:
        url = resolve_redis_url(redis_url, cwd)
    except ValueError as exc:
        print(f"pdserve status: {exc}", file=sys.stderr)
        return 2
    store = StateStore.from_url(url, timeout_s=_TIMEOUT_S)
    try:
        status = collect_status(store, url)
    except (redis.RedisError, OSError) as exc:
        print(f"pdserve status: cannot read Redis at {url}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    sys.stdout.write(json.dumps(status_to_dict(status), indent=2) + "\n" if as_json else render_status(status))
    return 0
