"""The autoscaling controller: one leader per cluster deciding every pool's replicas and acting on them.

A tick of the controller (every `AutoscalePolicy.tick_s`, in its own thread):
1. The policy: re-read if its file changed (policy.py; a bad edit keeps the last good policy).
2. Leadership: take or renew the Redis lock `autoscaler` (a lock with expiry, re-entrant for its
   owner). Another controller holds it → this one waits and does nothing; it takes over once the
   leader releases the lock or stops renewing it (it died) and the lock expires. A leader that loses
   the lock forgets its pools' decision state, so it starts afresh if it leads again.
3. The pools due for a decision (each on its own decision interval; a pool with a manual override is
   due every tick, so `pdserve scale` acts within a tick): their signals from Redis (signals.py).
4. Per pool: an override → held at its count (decide.override_decision); else `decide(...)`. The
   actuator is told the target at every decision, not only on a change, so a pool whose replica
   died converges back.
5. Every decision goes to the metrics (`pdserve:pool_desired_replicas`,
   `pdserve:autoscaler_decisions_total{model,pool,direction,reason}`) and to the desired-count hash;
   changes, and holds whose reason is new for the pool, to the event list (`pdserve status`).

Redis trouble in a tick is logged and the tick skipped; the lock expires if it lasts, and whoever
reaches Redis first leads next.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from cluster.autoscale.actuator import Actuator
from cluster.autoscale.decide import Decision, PoolState, decide, is_due, override_decision
from cluster.autoscale.events import Event, publish_desired, record_event
from cluster.autoscale.keys import LOCK_NAME
from cluster.autoscale.overrides import read_overrides
from cluster.autoscale.policy import AutoscalePolicy, PolicyFile
from cluster.autoscale.signals import read_signals
from cluster.metrics import AUTOSCALER_DECISIONS, POOL_DESIRED_REPLICAS
from cluster.state.store import StateStore

logger = logging.getLogger(__name__)


def new_controller_id() -> str:
    return f"autoscaler-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Controller:
    def __init__(self, store: StateStore, actuator: Actuator, policy: AutoscalePolicy | PolicyFile, *,
                 controller_id: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.actuator = actuator
        self._policy = policy
        self.controller_id = controller_id or new_controller_id()
        self._clock = clock
        self.is_leader = False
        self.states: dict[tuple[str, str], PoolState] = {}
        self._last_reason: dict[tuple[str, str], str] = {}
        self._overridden: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_ticks = 0
        self.num_failed_ticks = 0

    @property
    def policy(self) -> AutoscalePolicy:
        return self._policy.current() if isinstance(self._policy, PolicyFile) else self._policy

    # ---- one tick ----
    def step(self) -> list[Decision]:
        """One tick: lead (or wait), decide the pools that are due, act. Returns the decisions made."""
        policy = self.policy
        now = self._clock()
        if not self._lead(policy):
            return []
        overrides = read_overrides(self.store)
        due = [p for p in policy.pools
               if p.key in overrides or p.key in self._overridden or is_due(self.states.get(p.key, PoolState()), p, now)]
        if not due:
            return []
        signals = read_signals(self.store, [p.key for p in due], policy.look_back_period_s, now)
        decisions = []
        for p in due:
            s, state = signals[p.key], self.states.get(p.key, PoolState())
            if p.key in overrides:
                current = state.target if state.target is not None else s.num_replicas
                decision = override_decision(p.model, p.pool, overrides[p.key], state, current, now)
                self._overridden.add(p.key)
            else:
                if p.key in self._overridden:
                    self._overridden.discard(p.key)
                    self._event(Event(now, p.model, p.pool, state.target or 0, state.target or 0, "hold",
                                      "override_released", "manual override released: the policy decides again",
                                      self.controller_id))
                decision = decide(s, p, state, now)
            self.states[p.key] = decision.state
            self._act(decision, s.num_replicas)
            decisions.append(decision)
        return decisions

    def _lead(self, policy: AutoscalePolicy) -> bool:
        is_leader = self.store.acquire_lock(LOCK_NAME, self.controller_id, policy.leader_lock_ttl_s)
        if is_leader != self.is_leader:
            if is_leader:
                logger.info("%s leads the autoscaler", self.controller_id)
            else:
                logger.warning("%s is no longer the autoscaler's leader (held by %s)", self.controller_id,
                               self.store.lock_owner(LOCK_NAME))
            # Either way, start afresh: a new leader's view of the pools begins now.
            self.states.clear()
            self._last_reason.clear()
            self._overridden.clear()
        self.is_leader = is_leader
        return is_leader

    def _act(self, d: Decision, num_registered: int) -> None:
        self.actuator.scale(d.model, d.pool, d.desired)
        POOL_DESIRED_REPLICAS.labels(model=d.model, pool=d.pool).set(d.desired)
        AUTOSCALER_DECISIONS.labels(model=d.model, pool=d.pool, direction=d.direction, reason=d.reason).inc()
        publish_desired(self.store, d.model, d.pool, d.desired, num_registered, d.at)
        key = (d.model, d.pool)
        if d.is_change or self._last_reason.get(key) != d.reason:
            self._event(Event.of(d, self.controller_id, d.at))
            log = logger.info if d.is_change else logger.debug
            log("%s/%s %s %d -> %d (%s): %s", d.model, d.pool, d.direction, d.current, d.desired, d.reason,
                d.message)
        self._last_reason[key] = d.reason

    def _event(self, event: Event) -> None:
        record_event(self.store, event)

    # ---- the loop ----
    def run(self) -> None:
        """Tick until `stop()`; Redis errors skip a tick, they never end the loop."""
        while not self._stop.is_set():
            try:
                self.step()
                self.num_ticks += 1
            except Exception:  # noqa: BLE001 - the loop must outlive Redis blips and actuator bugs
                self.num_failed_ticks += 1
                logger.exception("autoscaler tick failed; retrying next tick")
            self._stop.wait(self.policy.tick_s)

    def start(self) -> Controller:
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="pdserve-autoscaler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop ticking and hand the lock over at once (no waiting out its TTL)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        try:
            self.store.release_lock(LOCK_NAME, self.controller_id)
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            logger.warning("could not release the autoscaler lock (%s); it expires by itself", exc)
        self.is_leader = False
