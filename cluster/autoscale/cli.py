"""`pdserve scale MODEL POOL N` and `pdserve scale MODEL POOL --release`: manual overrides from the shell.

Which Redis: `--redis-url`, else the one `pdserve up` recorded in ./.pdserve/up.json (as `pdserve
status`). The override is only written there; the autoscaler's leader applies it at its next tick.
Exit status: 0 done, 2 bad arguments or no Redis named, 1 Redis unreachable.
"""

from __future__ import annotations

import sys

import redis

from cluster.autoscale.overrides import check_override, release_override, set_override
from cluster.state.store import StateStore
from cluster.status import resolve_redis_url

_TIMEOUT_S = 5.0


def run_scale(model: str, pool: str, replicas: int | None, redis_url: str | None) -> int:
    try:
        check_override(model, pool, replicas)
        url = resolve_redis_url(redis_url)
    except ValueError as exc:
        print(f"pdserve scale: {exc}", file=sys.stderr)
        return 2
    store = StateStore.from_url(url, timeout_s=_TIMEOUT_S)
    try:
        if replicas is None:
            had = release_override(store, model, pool)
            print(f"{model}/{pool}: override released; the autoscaling policy decides again" if had
                  else f"{model}/{pool}: had no override")
        else:
            set_override(store, model, pool, replicas)
            print(f"{model}/{pool}: held at {replicas} replica{'s' * (replicas != 1)} until "
                  f"`pdserve scale {model} {pool} --release`")
    except (redis.RedisError, OSError) as exc:
        print(f"pdserve scale: cannot reach Redis at {url}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0
