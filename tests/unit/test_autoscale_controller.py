"""The controller against a real embedded Redis and the fake actuator (whose replicas are registry
records): leader election (a second controller waits, and takes over on release or expiry), decisions
becoming replicas, events and metrics, and manual overrides holding until released."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from cluster.autoscale.actuator import FakeActuator
from cluster.autoscale.controller import Controller
from cluster.autoscale.events import read_desired, read_events
from cluster.autoscale.overrides import read_overrides, release_override, set_override
from cluster.autoscale.policy import AutoscalePolicy, PoolPolicy
from cluster.metrics import REGISTRY
from cluster.state import StateStore, start_embedded_redis

MODEL = "ctl"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    server = start_embedded_redis(tmp_path_factory.mktemp("autoscale-redis"))
    yield server.url
    server.close()


@pytest.fixture
def store(redis_url) -> Iterator[StateStore]:
    s = StateStore.from_url(redis_url)
    s.r.flushdb()
    yield s
    s.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make_policy(**kw) -> AutoscalePolicy:
    pool = dict(model=MODEL, pool="decode", min_replicas=1, max_replicas=4, target_queue_depth=2,
                upscale_delay_s=2.0, downscale_delay_s=5.0, decision_interval_s=1.0)
    return AutoscalePolicy(pools=(PoolPolicy(**{**pool, **kw}),), leader_lock_ttl_s=30.0)


def decisions_total(direction: str, reason: str) -> float:
    labels = {"model": MODEL, "pool": "decode", "direction": direction, "reason": reason}
    return REGISTRY.get_sample_value("pdserve:autoscaler_decisions_total", labels) or 0.0


def test_one_leader_at_a_time_the_second_waits_then_takes_over(store):
    clock, policy = Clock(), make_policy()
    a_act, b_act = FakeActuator(store), FakeActuator(store)
    a = Controller(store, a_act, policy, controller_id="a", clock=clock)
    b = Controller(store, b_act, policy, controller_id="b", clock=clock)
    assert [d.desired for d in a.step()] == [1]  # no replica yet: up to min_replicas at once
    assert b.step() == [] and not b.is_leader and a.is_leader
    clock.now += 10
    assert b.step() == [] and b_act.calls == []  # still waiting, however long
    a.stop()  # hands the lock over at once
    assert b.step() and b.is_leader and b_act.calls == [(MODEL, "decode", 1)]  # sees a's replica: holds at 1
    assert a.step() == [] and not a.is_leader


def test_a_leader_that_stops_renewing_loses_the_lock_when_it_expires(store):
    policy = AutoscalePolicy(pools=make_policy().pools, leader_lock_ttl_s=0.2)
    a = Controller(store, FakeActuator(store), policy, controller_id="a")
    b = Controller(store, FakeActuator(store), policy, controller_id="b")
    a.step()
    assert a.is_leader and b.step() == []
    deadline = time.monotonic() + 10
    while not b.step():  # a is "dead": it never ticks again
        assert time.monotonic() < deadline, "the lock never expired"
        time.sleep(0.05)
    assert b.is_leader and store.lock_owner("autoscaler") == "b"
    assert a.step() == [] and not a.is_leader  # a comes back: it waits now


def test_queue_depth_scales_up_after_the_delay_then_down_and_every_change_is_an_event(store):
    clock, actuator = Clock(), FakeActuator(store)
    c = Controller(store, actuator, make_policy(), controller_id="lead", clock=clock)
    c.step()  # -> 1 replica
    store.set_queue_depth(MODEL, "decode", "router-1", 7, ttl_s=600)  # 7 waiting at 2 per replica: 4
    up_before = decisions_total("up", "load")
    for _ in range(3):
        clock.now += 1
        c.step()
    assert actuator.num_replicas(MODEL, "decode") == 4
    assert [w.worker_id for w in store.list_workers(MODEL, "decode")] == sorted(actuator.worker_ids(MODEL, "decode"))
    assert decisions_total("up", "load") == up_before + 1
    assert REGISTRY.get_sample_value("pdserve:pool_desired_replicas", {"model": MODEL, "pool": "decode"}) == 4
    assert read_desired(store)[(MODEL, "decode")]["desired"] == 4

    store.set_queue_depth(MODEL, "decode", "router-1", 0, ttl_s=600)
    for _ in range(6):
        clock.now += 1
        c.step()
    assert actuator.num_replicas(MODEL, "decode") == 1
    events = read_events(store, limit=10, model=MODEL)
    # Newest first: the downscale, its wait (logged once), the upscale, its wait, the start at min_replicas.
    assert [(e.direction, e.reason, e.current, e.desired) for e in events] == [
        ("down", "load", 4, 1), ("hold", "downscale_delay", 4, 4), ("up", "load", 1, 4),
        ("hold", "upscale_delay", 1, 1), ("up", "min_replicas", 0, 1)]
    assert all(e.controller == "lead" for e in events) and "7 waiting" in events[2].message


def test_an_override_holds_until_released(store):
    clock, actuator = Clock(), FakeActuator(store)
    c = Controller(store, actuator, make_policy(), controller_id="lead", clock=clock)
    c.step()
    set_override(store, MODEL, "decode", 6)  # above max_replicas: the operator's call
    clock.now += 0.1  # not yet due by the policy's interval: an override acts at the next tick
    (d,) = c.step()
    assert (d.desired, d.reason) == (6, "override") and actuator.num_replicas(MODEL, "decode") == 6
    for _ in range(20):  # no load, well past every delay: still held
        clock.now += 1
        c.step()
    assert actuator.num_replicas(MODEL, "decode") == 6 and read_overrides(store) == {(MODEL, "decode"): 6}

    assert release_override(store, MODEL, "decode") and not release_override(store, MODEL, "decode")
    clock.now += 1
    (d,) = c.step()
    assert (d.desired, d.reason) == (4, "max_replicas")  # the policy again: its bounds first
    reasons = [e.reason for e in read_events(store, limit=3, model=MODEL)]
    assert reasons[:2] == ["max_replicas", "override_released"]


def test_bad_overrides_name_the_field(store):
    with pytest.raises(ValueError, match="replicas: must be an integer >= 0, got -1"):
        set_override(store, MODEL, "decode", -1)
    with pytest.raises(ValueError, match="pool: must be one of prefill, decode, unified"):
        set_override(store, MODEL, "router", 1)
