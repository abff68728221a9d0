"""The Ray actuator: adds worker replicas as Ray actors and removes them by draining first.

A replica's life here:
1. `scale` wants one more → a `Replica` in state `starting`, and in a background thread the pool's
   `ReplicaFactory` creates the actor (named `pdserve-autoscale/{model}/{pool}/{id}`; a TP replica
   reserves a STRICT_PACK placement group first, replicas.py) and waits until it serves; the worker
   registers itself in Redis, and routers pick it up at their next poll → `serving`.
2. `scale` wants one fewer → the victim is a starting replica if there is one (it serves nothing yet:
   it is drained the moment it is up), else the least loaded serving one by its last load report
   (newest first on a tie) → `draining`, in a background thread:
   a. Drain(deadline 0): the worker stops admitting (new calls get UNAVAILABLE, which a router takes
      as "try another worker") and leaves the registry, so routers stop choosing it at their next poll;
   b. Drain again every `poll_s` — it is idempotent and answers how many calls are still in flight
      there (a prefill call includes sending its KV; a simulated worker adds its queued ones) — until
      none is left, or `drain_timeout_s` passes (then what remains is cut by the stop below, and the
      router resumes those streams on another worker: a removal never fails a request);
   c. stop: the actor's `shutdown()` (its gRPC server and engine), then `ray.kill`, then its
      placement group is removed → gone.
A start that fails is logged and forgotten; the controller's next `scale` tries again. A serving
replica whose actor died (its last ping failed) is forgotten at the next `scale`, which starts a
replacement; the router has already resumed its streams on other workers.

Named actors let a new leader (another controller process) find the replicas the previous one
started: `adopt_existing()`. Replicas started elsewhere (`pdserve up`'s first workers) are handed
over with `adopt()`: the actuator manages, counts and may remove only the replicas it knows.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import grpc

from cluster.protogen import ensure_generated
from cluster.state.store import StateStore

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

logger = logging.getLogger(__name__)

NAME_PREFIX = "pdserve-autoscale"
_RPC_TIMEOUT_S = 10.0


@dataclass
class StartedReplica:
    """A replica that serves: its actor (rank 0 of a TP replica), gRPC address and registry id."""

    actor: Any
    address: str
    worker_id: str
    placement_group: Any = None  # removed with the replica


# (actor name) -> a serving replica; blocks until it serves, raises if it cannot start.
ReplicaFactory = Callable[[str], StartedReplica]
Factories = Mapping[tuple[str, str], ReplicaFactory] | Callable[[str, str], ReplicaFactory]


@dataclass
class Replica:
    name: str
    model: str
    pool: str
    state: str = "starting"  # starting | serving | draining
    started: StartedReplica | None = None
    is_cancelled: bool = False  # scaled away while starting: drained as soon as it serves
    ping: Any = None  # an outstanding ping(): resolves with an error once the actor has died
    order: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # monotonic times: created, serving, draining

    @property
    def is_active(self) -> bool:
        return self.state in ("starting", "serving") and not self.is_cancelled


def actor_name(model: str, pool: str) -> str:
    return f"{NAME_PREFIX}/{quote(model, safe='')}/{quote(pool, safe='')}/{uuid.uuid4().hex[:10]}"


def parse_actor_name(name: str) -> tuple[str, str] | None:
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != NAME_PREFIX:
        return None
    return unquote(parts[1]), unquote(parts[2])


class RayActuator:
    def __init__(self, factories: Factories, *, store: StateStore | None = None, drain_timeout_s: float = 600.0,
                 poll_s: float = 0.2, max_parallel: int = 8) -> None:
        self._factories = factories
        self.store = store  # for load reports when choosing whom to remove; without it, newest first
        self.drain_timeout_s = drain_timeout_s
        self.poll_s = poll_s
        self._replicas: dict[tuple[str, str], list[Replica]] = {}
        self._lock = threading.Lock()
        self._order = itertools.count()
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="pdserve-actuator")
        self._closed = False
        self.history: list[tuple[float, str, str, str, str]] = []  # (monotonic, model, pool, name, event)

    # ---- the Actuator protocol ----
    def scale(self, model: str, pool: str, num_replicas: int) -> None:
        if num_replicas < 0:
            raise ValueError(f"num_replicas must be >= 0, got {num_replicas}")
        with self._lock:
            if self._closed:
                return
            replicas = self._replicas.setdefault((model, pool), [])
            self._reap(replicas)
            active = [r for r in replicas if r.is_active]
            for _ in range(num_replicas - len(active)):
                r = Replica(actor_name(model, pool), model, pool, order=next(self._order))
                r.timings["created"] = time.monotonic()
                replicas.append(r)
                self._note(r, "starting")
                self._pool.submit(self._start, r)
            for r in self._victims(active, len(active) - num_replicas):
                if r.state == "starting":
                    r.is_cancelled = True
                    self._note(r, "cancelled")
                else:
                    self._begin_drain(r)

    def num_replicas(self, model: str, pool: str) -> int:
        with self._lock:
            return sum(r.is_active for r in self._replicas.get((model, pool), []))

    def close(self, kill: bool = True) -> None:
        """Stop acting: drains in progress end at once, starts in progress are waited for; with `kill`,
        end every actor it manages (no drain: shutting down)."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            replicas = [r for rs in self._replicas.values() for r in rs]
        if kill:
            for r in replicas:
                if r.started is not None:
                    self._stop(r.started)

    # ---- what it manages ----
    def replicas(self, model: str, pool: str) -> list[Replica]:
        with self._lock:
            return list(self._replicas.get((model, pool), []))

    def adopt(self, model: str, pool: str, replica: StartedReplica, name: str = "") -> None:
        """Manage a replica started elsewhere (it may be removed like one of ours)."""
        with self._lock:
            r = Replica(name or replica.worker_id, model, pool, "serving", replica, order=next(self._order))
            r.timings["serving"] = time.monotonic()
            self._replicas.setdefault((model, pool), []).append(r)
            self._note(r, "adopted")

    def adopt_existing(self) -> int:
        """Adopt the named replicas a previous leader started in this Ray namespace; returns how many."""
        import ray

        known = {r.name for rs in self._replicas.values() for r in rs}
        found = 0
        for name in ray.util.list_named_actors():
            key = parse_actor_name(name)
            if key is None or name in known:
                continue
            try:
                actor = ray.get_actor(name)
                address, worker_id = ray.get([actor.address.remote(), actor.worker_id.remote()], timeout=_RPC_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a dying actor is simply not adopted
                logger.warning("could not adopt %s: %s", name, exc)
                continue
            self.adopt(*key, StartedReplica(actor, address, worker_id), name=name)
            found += 1
        return found

    # ---- background work ----
    def _start(self, r: Replica) -> None:
        try:
            started = self._factory(r.model, r.pool)(r.name)
        except Exception as exc:  # noqa: BLE001 - logged; the next scale() tries again
            logger.error("could not start a %s/%s replica: %s", r.model, r.pool, exc)
            with self._lock:
                self._replicas[(r.model, r.pool)].remove(r)
                self._note(r, "failed")
            return
        with self._lock:
            r.started = started
            r.timings["serving"] = time.monotonic()
            self._note(r, "serving")
            if self._closed:
                return  # close() waits for this start, then stops it with the rest (or leaves it to Ray)
            if r.is_cancelled:
                self._begin_drain(r)
            else:
                r.state = "serving"

    def _begin_drain(self, r: Replica) -> None:
        """Under the lock."""
        r.state = "draining"
        r.timings["draining"] = time.monotonic()
        self._note(r, "draining")
        self._pool.submit(self._drain, r)

    def _drain(self, r: Replica) -> None:
        assert r.started is not None
        deadline = time.monotonic() + self.drain_timeout_s
        with grpc.insecure_channel(r.started.address) as channel:
            stub = pb_grpc.WorkerStub(channel)
            is_first = True
            while True:
                try:
                    left = stub.Drain(pb.DrainRequest(deadline_seconds=0), timeout=_RPC_TIMEOUT_S).num_in_flight
                except grpc.RpcError as exc:
                    logger.warning("drain of %s: %s; stopping it", r.name, exc.code().name)
                    break
                if is_first:
                    with self._lock:
                        self._note(r, f"drain started with {left} in flight")
                    is_first = False
                if left == 0 or self._closed:
                    break
                if time.monotonic() > deadline:
                    logger.warning("drain of %s: %d requests still in flight after %.0f s; stopping it (routers "
                                   "resume them elsewhere)", r.name, left, self.drain_timeout_s)
                    break
                time.sleep(self.poll_s)
        self._stop(r.started)
        with self._lock:
            replicas = self._replicas.get((r.model, r.pool), [])
            if r in replicas:
                replicas.remove(r)
            self._note(r, "stopped")

    def _stop(self, started: StartedReplica) -> None:
        import ray

        try:
            ray.get(started.actor.shutdown.remote(), timeout=30)
        except Exception as exc:  # noqa: BLE001 - it is killed next anyway
            logger.warning("replica %s did not shut down cleanly: %s", started.worker_id, exc)
        ray.kill(started.actor)
        if started.placement_group is not None:
            ray.util.remove_placement_group(started.placement_group)

    # ---- helpers ----
    def _factory(self, model: str, pool: str) -> ReplicaFactory:
        if callable(self._factories) and not isinstance(self._factories, Mapping):
            return self._factories(model, pool)
        return self._factories[(model, pool)]

    def _victims(self, active: list[Replica], n: int) -> list[Replica]:
        if n <= 0:
            return []
        loads = {}
        ids = [r.started.worker_id for r in active if r.started is not None]
        if self.store is not None and ids:
            try:
                loads = self.store.get_loads(ids)
            except Exception as exc:  # noqa: BLE001 - newest first will do
                logger.warning("cannot read load reports to choose whom to remove: %s", exc)

        def cost(r: Replica) -> tuple:
            if r.state == "starting":
                return (0, 0, -r.order)
            report = loads.get(r.started.worker_id) if r.started is not None else None
            busy = report.num_running + report.num_waiting + report.num_waiting_for_kv if report else 0
            return (1, busy, -r.order)

        return sorted(active, key=cost)[:n]

    def _reap(self, replicas: list[Replica]) -> None:
        """Forget serving replicas whose actor died (under the lock, without blocking): each keeps one
        ping in flight, and a ping that resolved with an error means the actor is gone. The caller then
        starts replacements like any missing replica; routers resume the dead one's streams elsewhere."""
        import ray

        for r in [r for r in replicas if r.state == "serving" and r.started is not None]:
            if r.ping is not None:
                ready, _ = ray.wait([r.ping], timeout=0)
                if not ready:
                    continue
                try:
                    ray.get(r.ping)
                except Exception as exc:  # noqa: BLE001 - RayActorError and kin: the actor is gone
                    replicas.remove(r)
                    self._note(r, f"died ({type(exc).__name__})")
                    if r.started.placement_group is not None:
                        ray.util.remove_placement_group(r.started.placement_group)
                    continue
            r.ping = r.started.actor.ping.remote()

    def _note(self, r: Replica, event: str) -> None:
        self.history.append((time.monotonic(), r.model, r.pool, r.name, event))
        logger.info("replica %s (%s/%s): %s", r.name, r.model, r.pool, event)
