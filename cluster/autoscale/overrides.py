"""Manual overrides: an operator pins a pool at N replicas (`pdserve scale MODEL POOL N`, or the Admin
gRPC call) and the autoscaler holds it there, whatever its signals say, until the override is released.

Overrides live in Redis, not in the leader, so they survive a leader change and any process that
reaches Redis can set one.
"""

from __future__ import annotations

from cluster.autoscale.keys import AutoscaleKeys, parse_pool_field, pool_field
from cluster.autoscale.policy import POOLS
from cluster.state.store import StateStore


def check_override(model: str, pool: str, replicas: int | None = None) -> None:
    """ValueError naming the field for a bad override."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"model: must be a non-empty string, got {model!r}")
    if pool not in POOLS:
        raise ValueError(f"pool: must be one of {', '.join(POOLS)}, got {pool!r}")
    if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0):
        raise ValueError(f"replicas: must be an integer >= 0, got {replicas!r}")


def set_override(store: StateStore, model: str, pool: str, replicas: int) -> None:
    check_override(model, pool, replicas)
    store.r.hset(AutoscaleKeys(store.keys.prefix).overrides, pool_field(model, pool), int(replicas))


def release_override(store: StateStore, model: str, pool: str) -> bool:
    """True if there was one."""
    check_override(model, pool)
    return bool(store.r.hdel(AutoscaleKeys(store.keys.prefix).overrides, pool_field(model, pool)))


def read_overrides(store: StateStore) -> dict[tuple[str, str], int]:
    raw = store.r.hgetall(AutoscaleKeys(store.keys.prefix).overrides)
    return {parse_pool_field(f): int(v) for f, v in raw.items()}
