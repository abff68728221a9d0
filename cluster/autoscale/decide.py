"""The autoscaler's pure core: `decide(signals, policy, state, now) -> Decision`, with the reason in words.

What a pool asks for (`wanted`), from its signals:
- Load. Every request of the pool is running on a replica or waiting (in a router's admission queue,
  or inside a worker). One replica can hold `capacity + target_queue_depth` of them: `capacity` is
  what it runs at once (the policy's `replica_capacity`, else the `max_num_seqs` its workers report;
  while requests wait, no more than it is observed running, since a KV-bound engine fills before its
  sequence cap), plus the waiting requests the policy tolerates per replica. wanted = ceil(ongoing /
  that). With no capacity known it is ceil(ongoing / target_queue_depth): exactly Ray Serve's
  target_ongoing_requests rule. Either way it only grows past the current count once more than
  `target_queue_depth` requests wait per replica, and it depends on the demand, not on the replica
  count, so a steady load settles on one count instead of oscillating.
- Traffic with nothing ongoing at that instant (arrivals seen) still wants one replica.
- SLOs and KV: P95 TTFT or ITL above its target, or mean KV usage above `kv_usage_high`, wants one
  replica more than now; KV usage above `kv_usage_low` forbids a downscale.

How that becomes the new target, in the manner of Ray Serve's delay logic (wall-clock, reset by any
decision in the other direction or a steady one): below min_replicas or above max_replicas → there at
once; from zero with demand → up at once (a cold start must not wait); a wish to go up must hold for
`upscale_delay_s`, down for `downscale_delay_s` (for the step 1 → 0, `downscale_to_zero_delay_s`) —
a load that swings back and forth within those windows never moves the pool; a pool that wants more
than `max_replicas` and is there holds with reason `at_max`. A change is at most `max_step` replicas;
the rest follows at the next decisions without a new wait while the wish lasts. No downscale while
fewer replicas are registered than the target (starting, or missing): their demand cannot be seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from cluster.autoscale.policy import PoolPolicy

Direction = Literal["up", "down", "hold"]
_EPS = 1e-6  # float slack on delays and divisions (Ray Serve's _DELAY_ELAPSED_EPS_S)


@dataclass(frozen=True)
class PoolSignals:
    """One pool's figures at one instant (signals.py reads them from Redis)."""

    model: str
    pool: str
    num_replicas: int = 0  # live registered workers
    num_running: int = 0  # requests running on them
    num_waiting: int = 0  # requests waiting inside them
    router_queue: int = 0  # requests waiting in routers' admission queues, counted for this pool
    kv_usage: float = 0.0  # mean KV-cache usage over its workers, 0..1
    replica_capacity: int = 0  # mean max_num_seqs its workers report; 0 = unknown
    arrival_rate: float | None = None  # requests/s over the look-back window; None = not measured
    ttft_p95_s: float | None = None  # None = no samples
    itl_p95_s: float | None = None

    @property
    def num_queued(self) -> int:
        return self.router_queue + self.num_waiting

    @property
    def num_ongoing(self) -> int:
        return self.num_running + self.num_queued


@dataclass(frozen=True)
class PoolState:
    """What one pool's decisions carry from one to the next."""

    target: int | None = None  # the replica count last decided; None = none yet (start from what runs)
    pending: int = 0  # +1 / -1: a change in that direction is wanted and waits out its delay
    pending_since: float | None = None
    decided_at: float | None = None


@dataclass(frozen=True)
class Decision:
    model: str
    pool: str
    current: int  # the target before this decision
    desired: int  # the target after it
    wanted: int  # what the signals ask for, within [min_replicas, max_replicas]
    direction: Direction
    reason: str  # a short label (the metric's `reason`)
    message: str  # the reason in words
    at: float
    state: PoolState

    @property
    def is_change(self) -> bool:
        return self.desired != self.current


def is_due(state: PoolState, policy: PoolPolicy, now: float) -> bool:
    """A pool is decided once per decision interval."""
    return state.decided_at is None or now - state.decided_at + _EPS >= policy.decision_interval_s


def decide(signals: PoolSignals, policy: PoolPolicy, state: PoolState, now: float) -> Decision:
    lo, hi = policy.min_replicas, policy.max_replicas
    current = state.target if state.target is not None else signals.num_replicas

    def made(desired: int, reason: str, message: str, pending: int = 0, since: float | None = None,
             wanted: int | None = None) -> Decision:
        direction: Direction = "up" if desired > current else "down" if desired < current else "hold"
        new_state = PoolState(desired, pending, since if pending else None, now)
        return Decision(signals.model, signals.pool, current, desired, desired if wanted is None else wanted,
                        direction, reason, message, now, new_state)

    if current < lo:
        return made(lo, "min_replicas", f"{current} replicas is below min_replicas {lo}")
    if current > hi:
        return made(hi, "max_replicas", f"{current} replicas is above max_replicas {hi}")
    raw, reason, why = wanted_replicas(signals, policy, current)
    wanted = min(max(raw, lo), hi)
    if current == 0:
        if wanted == 0:
            return made(0, "steady", f"no demand ({why}); the pool stays at zero")
        return made(_step(0, wanted, policy), "from_zero", f"{why}: up from zero at once (cold start)",
                    wanted=wanted)
    if raw > hi and current == hi:
        return made(current, "at_max", f"{why}: wants {raw} but is at max_replicas {hi}", wanted=wanted)
    if wanted == current:
        # A hold the load alone would not explain (KV usage forbidding a downscale) keeps its label.
        return made(current, "steady" if reason == "load" else reason,
                    f"{why}: {current} replica{'s' * (current != 1)} is right")
    up = wanted > current
    if not up and signals.num_replicas < current:
        # Replicas still starting, or gone from the registry (dead, or heartbeats starved): their demand
        # is not in the signals (a router refuses, rather than queues, what no worker can take), so
        # their absence is no evidence for fewer. As Kubernetes' HPA, never scale down on missing data.
        return made(current, "replicas_pending",
                    f"{why}: wants {wanted}, but {signals.num_replicas} of {current} replicas are registered; "
                    "no downscale until they all are", wanted=wanted)
    direction = 1 if up else -1
    since = state.pending_since if state.pending == direction and state.pending_since is not None else now
    if up:
        delay, delay_name = policy.upscale_delay_s, "upscale_delay_s"
    elif current == 1:  # the step to zero, alone (as Ray Serve: only 1 -> 0 goes to zero)
        delay, delay_name, reason = policy.to_zero_delay_s, "downscale_to_zero_delay_s", "scale_to_zero"
    else:
        delay, delay_name = policy.downscale_delay_s, "downscale_delay_s"
        wanted = max(wanted, 1)
    waited = now - since
    if waited + _EPS < delay:
        return made(current, "upscale_delay" if up else "downscale_delay",
                    f"{why}: wants {wanted}, for {waited:.1f} s of {delay_name} {delay:g} s", direction, since,
                    wanted=wanted)
    desired = _step(current, wanted, policy)
    # More steps to go: keep the wish (and its elapsed delay), so the next decision takes the next step.
    pending = direction if desired != wanted else 0
    return made(desired, reason, f"{why}: {current} -> {desired}", pending, since, wanted=wanted)


def override_decision(model: str, pool: str, replicas: int, state: PoolState, current: int, now: float,
                      ) -> Decision:
    """A manual override: the pool is held at `replicas` (no bounds: the operator decides) until released."""
    direction: Direction = "up" if replicas > current else "down" if replicas < current else "hold"
    return Decision(model, pool, current, replicas, replicas, direction, "override",
                    f"manual override: {replicas} replica{'s' * (replicas != 1)} until released", now,
                    replace(state, target=replicas, pending=0, pending_since=None, decided_at=now))


def wanted_replicas(signals: PoolSignals, policy: PoolPolicy, current: int) -> tuple[int, str, str]:
    """(replicas the signals ask for, before bounds; the reason's label; the reason in words)."""
    s = signals
    capacity = policy.replica_capacity or s.replica_capacity
    if capacity and s.num_queued and s.num_replicas:
        # Requests wait, so the replicas are full: what they run now is what fits (KV may bound it).
        capacity = min(capacity, max(1.0, s.num_running / s.num_replicas))
    per_replica = capacity + policy.target_queue_depth
    wanted = math.ceil(s.num_ongoing / per_replica - _EPS) if s.num_ongoing else 0
    reason = "load"
    why = f"{s.num_running} running + {s.num_queued} waiting at {per_replica:g} per replica"
    if wanted == 0 and s.arrival_rate:
        wanted, why = 1, f"{s.arrival_rate:.2g} requests/s arriving"
    for label, seen, target, unit in (("ttft_slo", s.ttft_p95_s, policy.ttft_p95_s, "TTFT P95"),
                                      ("itl_slo", s.itl_p95_s, policy.itl_p95_s, "ITL P95")):
        if target is not None and seen is not None and seen > target and wanted <= current:
            wanted, reason = current + 1, label
            why = f"{unit} {seen * 1e3:.0f} ms above its target {target * 1e3:.0f} ms"
    if policy.kv_usage_high is not None and s.num_replicas and s.kv_usage > policy.kv_usage_high \
            and wanted <= current:
        wanted, reason = current + 1, "kv_usage"
        why = f"KV usage {s.kv_usage:.0%} above kv_usage_high {policy.kv_usage_high:.0%}"
    if policy.kv_usage_low is not None and s.kv_usage > policy.kv_usage_low and wanted < current:
        wanted, reason = current, "kv_usage"
        why = f"KV usage {s.kv_usage:.0%} above kv_usage_low {policy.kv_usage_low:.0%} holds the downscale"
    return wanted, reason, why


def _step(current: int, wanted: int, policy: PoolPolicy) -> int:
    if policy.max_step is None:
        return wanted
    return current + max(-policy.max_step, min(policy.max_step, wanted - current))
