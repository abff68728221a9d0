"""Decision events and desired counts in Redis: what `pdserve status` and the Admin API show.

The leader appends an event for every decision that changes a pool's target, and for a hold whose
reason differs from the pool's previous decision (a pool waiting out its delay, or stuck at its
maximum, is logged once, not every interval). The list is capped at `MAX_EVENTS`, newest first.
Each pool's latest target also goes to a hash, so readers see it without scanning events.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from cluster.autoscale.decide import Decision
from cluster.autoscale.keys import AutoscaleKeys, parse_pool_field, pool_field
from cluster.state.store import StateStore

MAX_EVENTS = 1000


@dataclass(frozen=True)
class Event:
    at: float  # wall-clock seconds
    model: str
    pool: str
    current: int
    desired: int
    direction: str  # up | down | hold
    reason: str
    message: str
    controller: str = ""  # the leader that decided

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, data: str) -> Event:
        record = json.loads(data)
        return cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})

    @classmethod
    def of(cls, decision: Decision, controller: str, at: float | None = None) -> Event:
        return cls(time.time() if at is None else at, decision.model, decision.pool, decision.current,
                   decision.desired, decision.direction, decision.reason, decision.message, controller)


def _keys(store: StateStore) -> AutoscaleKeys:
    return AutoscaleKeys(store.keys.prefix)


def record_event(store: StateStore, event: Event) -> None:
    k = _keys(store)
    with store.r.pipeline(transaction=True) as p:
        p.lpush(k.events, event.to_json())
        p.ltrim(k.events, 0, MAX_EVENTS - 1)
        p.execute()


def read_events(store: StateStore, limit: int = 20, model: str | None = None,
                pool: str | None = None) -> list[Event]:
    """The newest `limit` events (optionally of one model / pool), newest first."""
    k = _keys(store)
    events = [Event.from_json(e) for e in store.r.lrange(k.events, 0, MAX_EVENTS - 1)]
    chosen = [e for e in events if (model is None or e.model == model) and (pool is None or e.pool == pool)]
    return chosen[:limit]


def publish_desired(store: StateStore, model: str, pool: str, desired: int, replicas: int,
                    at: float | None = None) -> None:
    record = {"desired": desired, "replicas": replicas, "at": time.time() if at is None else at}
    store.r.hset(_keys(store).desired, pool_field(model, pool), json.dumps(record))


def read_desired(store: StateStore) -> dict[tuple[str, str], dict]:
    """(model, pool) -> {desired, replicas, at} as the leader last published it."""
    raw = store.r.hgetall(_keys(store).desired)
    return {parse_pool_field(f): json.loads(v) for f, v in raw.items()}
