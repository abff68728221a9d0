"""P/D selection policies (cluster/router/policy.py) over snapshots, and the load figures a router
builds from published reports plus its own requests (discovery.WorkerState): no Redis, no workers."""

from __future__ import annotations

import collections

import pytest

from cluster.router.config import RouterConfig
from cluster.router.discovery import WorkerState
from cluster.router.policy import Candidate, RouteRequest, make_policy
from cluster.state import LoadReport

REQ = RouteRequest(num_prompt_tokens=100, max_tokens=16)


def report(num_running: int = 0, num_waiting: int = 0, free: int = 100, max_num_seqs: int = 0) -> LoadReport:
    return LoadReport(num_running=num_running, num_waiting=num_waiting, num_waiting_for_kv=0, num_free_blocks=free,
                      num_total_blocks=100, kv_usage=1 - free / 100, max_num_seqs=max_num_seqs)


def route(policy, workers: list[WorkerState], n: int, cached: dict[str, int] | None = None,
          blocks: int = 0) -> collections.Counter:
    """Send n requests that never finish, counting each in flight on its decode worker as dispatch does."""
    cached = cached or {}
    counts: collections.Counter = collections.Counter()
    for _ in range(n):
        _, d = policy.select([], [w.candidate(cached.get(w.worker_id, 0)) for w in workers], REQ)
        state = next(w for w in workers if w.worker_id == d.worker_id)
        state.num_in_flight += 1
        state.num_reserved_blocks += blocks
        counts[d.worker_id] += 1
    return counts


def test_round_robin_takes_turns_whatever_the_load():
    policy = make_policy("round_robin", "round_robin")
    busy, idle = Candidate("a", load=50), Candidate("b", load=0)
    picks = [policy.select([], [busy, idle], REQ)[1].worker_id for _ in range(6)]
    assert collections.Counter(picks) == {"a": 3, "b": 3}
    assert all(x != y for x, y in zip(picks, picks[1:], strict=False))


def test_least_loaded_picks_the_idle_worker_and_spreads_ties():
    policy = make_policy("least_loaded", "least_loaded")
    assert policy.select([], [Candidate("a", load=3), Candidate("b", load=1)], REQ)[1].worker_id == "b"
    workers = [WorkerState(w, f"127.0.0.1:{i}") for i, w in enumerate("abc")]
    assert route(policy, workers, 9) == {"a": 3, "b": 3, "c": 3}


def test_least_loaded_counts_published_load_and_this_routers_requests_since():
    policy = make_policy("least_loaded", "least_loaded")
    a, b = WorkerState("a", "h:1"), WorkerState("b", "h:2")
    a.observe(report(num_running=3, num_waiting=1))  # 4 requests a heartbeat ago
    b.observe(report())
    # b takes the next 4 (its load rises with this router's in-flight count), then they alternate.
    assert route(policy, [a, b], 8) == {"a": 2, "b": 6}
    assert (a.load, b.load) == (6, 6)
    # The next report already includes what this router sent: not counted twice.
    a.observe(report(num_running=6))
    assert a.load == 6
    a.num_in_flight -= 2  # two of ours finished since that report
    assert a.load == 4


def test_prefix_aware_follows_the_cache_until_the_load_outweighs_it():
    policy = make_policy("prefix_aware", "prefix_aware", prefix_load_weight=64)
    assert policy.select([], [Candidate("a", cached_tokens=0), Candidate("b", cached_tokens=256)],
                         REQ)[1].worker_id == "b"
    # 256 cached tokens are worth 4 requests of load at weight 64.
    assert policy.select([], [Candidate("a", load=0), Candidate("b", load=5, cached_tokens=256)],
                         REQ)[1].worker_id == "a"
    # Equal scores: the less loaded one.
    assert policy.select([], [Candidate("a", load=4, cached_tokens=256), Candidate("b", load=0)],
                         REQ)[1].worker_id == "b"


def test_one_hot_prefix_does_not_pile_everything_on_one_worker():
    hot = {"a": 512}  # every request shares a prefix only worker a has cached

    def send(weight: float) -> collections.Counter:
        workers = [WorkerState("a", "h:1"), WorkerState("b", "h:2")]
        return route(make_policy("prefix_aware", "prefix_aware", prefix_load_weight=weight), workers, 40, hot)

    # a takes requests until it leads by what its cache is worth (512 / 64 = 8 requests); then they alternate.
    assert send(64) == {"a": 24, "b": 16}
    # Without the load term every request would land on a.
    assert send(0) == {"a": 40}


def test_kv_aware_picks_the_most_free_blocks_net_of_reservations():
    policy = make_policy("least_loaded", "kv_aware")
    a, b, new = WorkerState("a", "h:1"), WorkerState("b", "h:2"), WorkerState("c", "h:3")
    a.observe(report(free=100))
    b.observe(report(free=60))
    # Each request may take 30 blocks on its worker: a is picked until its net free falls below b's.
    counts = route(policy, [a, b, new], 3, blocks=30)
    assert counts == {"a": 2, "b": 1}  # 100 → 70 → 40 (< 60) → b; c has not reported: last
    assert (a.free_blocks, b.free_blocks, new.free_blocks) == (40, 30, None)
    # Equal free blocks: the less loaded one.
    assert policy.select([], [Candidate("a", load=2, free_blocks=10), Candidate("b", load=1, free_blocks=10)],
                         REQ)[1].worker_id == "b"


def test_conditional_disaggregation_is_decided_on_the_uncached_part():
    policy = make_policy("least_loaded", "prefix_aware")
    prefills = [Candidate("p")]
    cached_d = Candidate("d", cached_tokens=96)
    # 100 prompt tokens, 96 cached on D: 4 left, under min_prefill_tokens=32 → D prefills them itself.
    p, d = policy.select(prefills, [cached_d], RouteRequest(100, 16, min_prefill_tokens=32))
    assert p is None and d.worker_id == "d"
    p, d = policy.select(prefills, [Candidate("d")], RouteRequest(100, 16, min_prefill_tokens=32))
    assert p is not None and p.worker_id == "p"
    # No prefill worker live: D prefills rather than the request failing.
    assert policy.select([], [Candidate("d")], RouteRequest(100, 16))[0] is None


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"prefill_policy": "fastest"}, "prefill_policy"),
    ({"prefill_policy": "kv_aware"}, "prefill_policy"),  # free decode blocks mean nothing for a prefill
    ({"decode_policy": "random"}, "decode_policy"),
])
def test_an_unknown_policy_is_a_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be one of"):
        RouterConfig(**kwargs)
    with pytest.raises(ValueError, match=f"^{field} must be one of"):
        make_policy(**{"prefill_policy": "round_robin", "decode_policy": "round_robin", **kwargs})
