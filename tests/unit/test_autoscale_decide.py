"""decide() over signal sequences: a step, a ramp, a spike, an oscillation (no flapping), a pool at its
maximum, scale to zero and back, plus the SLO / KV / step rules. The pool is simulated by a small plant:
its replicas follow the decided target at once, each runs up to `CAPACITY` requests, the rest wait."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from cluster.autoscale.decide import (
    PoolSignals,
    PoolState,
    decide,
    is_due,
    override_decision,
    wanted_replicas,
)
from cluster.autoscale.policy import PoolPolicy

CAPACITY = 4
TQ = 2.0  # target_queue_depth: one replica holds CAPACITY + TQ = 6 requests


def policy(**kw) -> PoolPolicy:
    base = dict(model="m", pool="decode", min_replicas=1, max_replicas=10, target_queue_depth=TQ,
                replica_capacity=CAPACITY, upscale_delay_s=3.0, downscale_delay_s=20.0, decision_interval_s=1.0)
    return PoolPolicy(**{**base, **kw})


def signals(demand: int, replicas: int, **kw) -> PoolSignals:
    running = min(demand, replicas * CAPACITY)
    return PoolSignals("m", "decode", num_replicas=replicas, num_running=running, num_waiting=demand - running, **kw)


def simulate(demand: Callable[[int], int], p: PoolPolicy, seconds: int, start: int = 1) -> list:
    """One decision a second; returns [(t, decision)], the replicas following each target at once."""
    state, replicas, out = PoolState(target=start), start, []
    for t in range(seconds):
        d = decide(signals(demand(t), replicas), p, state, float(t))
        state, replicas = d.state, d.desired
        out.append((t, d))
    return out


def targets(run) -> list[int]:
    return [d.desired for _, d in run]


def changes(run) -> list[tuple[int, int, int]]:
    return [(t, d.current, d.desired) for t, d in run if d.is_change]


def test_a_step_scales_up_once_after_the_upscale_delay_and_then_holds():
    run = simulate(lambda t: 2 if t < 10 else 30, policy(), 60)
    # 30 requests at 6 per replica: 5 replicas, wanted from t=10, applied once 3 s have passed.
    assert changes(run) == [(13, 1, 5)]
    _, d = run[13]
    assert d.direction == "up" and d.reason == "load" and "1 -> 5" in d.message
    assert all(d.reason == "upscale_delay" for t, d in run[10:13])
    assert run[11][1].message.endswith("for 1.0 s of upscale_delay_s 3 s")


def test_a_ramp_is_followed_upwards_without_ever_going_down():
    run = simulate(lambda t: t, policy(), 60)
    tg = targets(run)
    assert tg == sorted(tg)  # monotonic: no flapping on the way up
    assert tg[-1] == math.ceil(59 / (CAPACITY + TQ))
    # Never more than the load asks for, and at most the upscale delay behind it.
    for t, d in run:
        assert d.desired <= max(1, math.ceil(t / (CAPACITY + TQ)))


def test_a_spike_shorter_than_the_upscale_delay_changes_nothing():
    run = simulate(lambda t: 50 if 10 <= t < 12 else 2, policy(), 40)
    assert changes(run) == []
    assert [d.reason for _, d in run[10:12]] == ["upscale_delay"] * 2
    assert run[12][1].reason == "steady"  # the wish was reset when the spike ended


def test_an_oscillating_load_does_not_flap():
    # Fast swings (2 s high, 2 s low) never outlast the upscale delay: nothing moves.
    fast = simulate(lambda t: 30 if (t // 2) % 2 else 2, policy(), 80)
    assert changes(fast) == []
    # Slow swings (10 s each) outlast it: up once, and the downscale delay (20 s) rides out the lows.
    slow = simulate(lambda t: 30 if (t // 10) % 2 else 2, policy(), 80)
    assert changes(slow) == [(13, 1, 5)]


def test_a_pool_at_max_holds_and_says_so():
    run = simulate(lambda t: 100, policy(max_replicas=3), 20)
    assert changes(run) == [(3, 1, 3)]
    at_max = [d for t, d in run if t > 3]
    assert {d.reason for d in at_max} == {"at_max"} and {d.desired for d in at_max} == {3}
    assert "wants 17 but is at max_replicas 3" in at_max[0].message


def test_scale_to_zero_uses_its_own_delay_and_comes_back_at_once():
    p = policy(min_replicas=0, downscale_delay_s=5.0, downscale_to_zero_delay_s=12.0)
    run = simulate(lambda t: 0 if t < 40 else 7, p, 50, start=2)
    # 2 -> 1 after downscale_delay_s, 1 -> 0 after downscale_to_zero_delay_s more, 0 -> 2 at once on demand.
    assert changes(run) == [(5, 2, 1), (18, 1, 0), (40, 0, 2)]
    assert run[18][1].reason == "scale_to_zero" and run[40][1].reason == "from_zero"
    assert run[17][1].message.endswith("of downscale_to_zero_delay_s 12 s")


def test_arrivals_with_nothing_ongoing_keep_one_replica_and_wake_a_pool_at_zero():
    p = policy(min_replicas=0, downscale_delay_s=0.0)
    d = decide(PoolSignals("m", "decode", num_replicas=1, arrival_rate=0.5), p, PoolState(target=1), 0.0)
    assert d.desired == 1 and d.reason == "steady"
    d = decide(PoolSignals("m", "decode", arrival_rate=0.5), p, PoolState(target=0), 0.0)
    assert (d.desired, d.reason) == (1, "from_zero")
    d = decide(PoolSignals("m", "decode"), p, PoolState(target=0), 0.0)
    assert (d.desired, d.reason) == (0, "steady")


def test_bounds_apply_at_once_and_max_step_paces_a_big_change():
    assert decide(signals(0, 0), policy(min_replicas=2), PoolState(), 0.0).desired == 2  # below min
    over = decide(signals(0, 12), policy(max_replicas=4), PoolState(), 0.0)
    assert (over.desired, over.direction, over.reason) == (4, "down", "max_replicas")
    run = simulate(lambda t: 60, policy(max_step=3), 10)
    # The delay is waited once; then one step a decision until the wish is met.
    assert changes(run) == [(3, 1, 4), (4, 4, 7), (5, 7, 10)]


def test_a_kv_bound_pool_counts_what_it_really_runs():
    # Nominal capacity 64, but KV fits 8 per replica: 20 waiting means more replicas.
    s = PoolSignals("m", "decode", num_replicas=2, num_running=16, num_waiting=20, replica_capacity=64)
    wanted, reason, why = wanted_replicas(s, policy(replica_capacity=None), 2)
    assert (wanted, reason) == (4, "load") and "16 running + 20 waiting at 10 per replica" in why
    # With nothing waiting, the nominal capacity applies: two replicas hold 16 easily.
    idle = PoolSignals("m", "decode", num_replicas=2, num_running=16, replica_capacity=64)
    assert wanted_replicas(idle, policy(replica_capacity=None), 2)[0] == 1


def test_no_known_capacity_is_ray_serves_target_ongoing_requests():
    s = PoolSignals("m", "prefill", num_replicas=1, num_running=9)
    assert wanted_replicas(s, policy(replica_capacity=None), 1)[0] == math.ceil(9 / TQ)


def test_slo_breaches_and_kv_thresholds():
    p = policy(ttft_p95_s=0.5, itl_p95_s=0.05, kv_usage_high=0.9, kv_usage_low=0.6, upscale_delay_s=0.0)
    slow = decide(signals(4, 2, ttft_p95_s=0.8), p, PoolState(target=2), 0.0)
    assert (slow.desired, slow.reason) == (3, "ttft_slo") and "TTFT P95 800 ms above its target 500 ms" in slow.message
    assert decide(signals(4, 2, itl_p95_s=0.06), p, PoolState(target=2), 0.0).reason == "itl_slo"
    full = decide(signals(4, 2, kv_usage=0.95), p, PoolState(target=2), 0.0)
    assert (full.desired, full.reason) == (3, "kv_usage")
    # Little load would allow 1 replica, but KV usage above kv_usage_low holds the pool.
    held = decide(signals(1, 3, kv_usage=0.7), policy(kv_usage_low=0.6, downscale_delay_s=0.0), PoolState(target=3), 0.0)
    assert (held.desired, held.direction, held.reason) == (3, "hold", "kv_usage")
    assert decide(signals(1, 3, kv_usage=0.5), policy(kv_usage_low=0.6, downscale_delay_s=0.0),
                  PoolState(target=3), 0.0).desired == 1


def test_decisions_come_once_per_interval_and_overrides_ignore_the_policy():
    p = policy(decision_interval_s=5.0)
    assert is_due(PoolState(), p, 0.0)
    assert not is_due(PoolState(decided_at=10.0), p, 14.0) and is_due(PoolState(decided_at=10.0), p, 15.0)
    d = override_decision("m", "decode", 25, PoolState(target=2, pending=1, pending_since=1.0), 2, 7.0)
    assert (d.current, d.desired, d.direction, d.reason) == (2, 25, "up", "override")
    assert d.state == PoolState(target=25, pending=0, pending_since=None, decided_at=7.0)


@pytest.mark.parametrize("replicas", [1, 3])
def test_steady_demand_at_the_target_stays(replicas):
    run = simulate(lambda t: replicas * (CAPACITY + 1), policy(), 30, start=replicas)
    assert changes(run) == [] and {d.reason for _, d in run} == {"steady"}


def test_no_downscale_while_replicas_are_missing_from_the_registry():
    p = policy(upscale_delay_s=0.0, downscale_delay_s=0.0)
    # Target 4, one registered (three starting, or their heartbeats lost): the quiet signals prove nothing.
    held = decide(signals(0, 1), p, PoolState(target=4), 0.0)
    assert (held.desired, held.direction, held.reason) == (4, "hold", "replicas_pending")
    assert "1 of 4 replicas are registered" in held.message
    # Upscales are not held back, and once all are registered the downscale goes ahead.
    assert decide(signals(60, 1), p, PoolState(target=4), 0.0).desired == 10
    assert decide(signals(0, 4), p, PoolState(target=4), 0.0).desired == 1
