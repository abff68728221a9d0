"""Signals read from a real embedded Redis: per-pool sums and means of the workers' load reports, the
routers' queue counted for the decode pool only, and routers' arrivals and latency samples (traffic.py)
turned into a rate and P95s over the look-back window."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster.autoscale.signals import read_signals
from cluster.autoscale.traffic import RESERVOIR, TrafficRecorder, read_traffic
from cluster.state import LoadReport, StateStore, WorkerInfo, start_embedded_redis

MODEL = "sig"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    server = start_embedded_redis(tmp_path_factory.mktemp("signals-redis"))
    yield server.url
    server.close()


@pytest.fixture
def store(redis_url) -> Iterator[StateStore]:
    s = StateStore.from_url(redis_url)
    s.r.flushdb()
    yield s
    s.close()


def load(running: int, waiting: int, for_kv: int = 0, usage: float = 0.0, max_num_seqs: int = 0) -> LoadReport:
    return LoadReport(num_running=running, num_waiting=waiting, num_waiting_for_kv=for_kv, num_free_blocks=10,
                      num_total_blocks=20, kv_usage=usage, max_num_seqs=max_num_seqs)


def test_pool_signals_from_registry_loads_and_queues(store):
    reports = {("d0", "decode"): load(6, 1, for_kv=5, usage=0.5, max_num_seqs=8),
               ("d1", "decode"): load(8, 3, usage=0.9, max_num_seqs=8),
               ("p0", "prefill"): load(1, 4, max_num_seqs=2)}
    for i, ((worker_id, role), report) in enumerate(reports.items()):
        store.register(WorkerInfo(worker_id, MODEL, role, f"127.0.0.1:{5000 + i}"), ttl_s=60)
        store.publish_load(worker_id, report, ttl_s=60)
    store.register(WorkerInfo("other", "another-model", "decode", "127.0.0.1:6000"), ttl_s=60)
    for pool in ("prefill", "decode"):  # a router reports its (per model) queue under every pool
        store.set_queue_depth(MODEL, pool, "router-a", 7, ttl_s=60)
    s = read_signals(store, [(MODEL, "decode"), (MODEL, "prefill"), (MODEL, "unified")])
    d, p, u = s[(MODEL, "decode")], s[(MODEL, "prefill")], s[(MODEL, "unified")]
    # Waiting for KV is waiting on the prefill pool: not decode's load.
    assert (d.num_replicas, d.num_running, d.num_waiting, d.router_queue) == (2, 14, 4, 7)
    assert d.kv_usage == pytest.approx(0.7) and d.replica_capacity == 8 and d.num_ongoing == 25
    # The router's queue is in front of the decode capacity: the prefill pool's backlog is its own.
    assert (p.num_replicas, p.num_running, p.num_waiting, p.router_queue, p.replica_capacity) == (1, 1, 4, 0, 2)
    assert (u.num_replicas, u.num_ongoing, u.arrival_rate, u.ttft_p95_s) == (0, 0, None, None)


def test_traffic_rate_and_percentiles_over_the_window(store):
    clock = [1000.2]
    recorder = TrafficRecorder(store, clock=lambda: clock[0])
    for second in range(10):  # 3 arrivals a second for 10 s
        clock[0] = 1000.2 + second
        for _ in range(3):
            recorder.arrival(MODEL)
    clock[0] = 1005.0
    for ms in range(1, 101):  # TTFT 1..100 ms
        recorder.ttft(MODEL, ms / 1e3)
    recorder.itl(MODEL, 0.5)  # old: outside a 5 s window read at t=1011
    recorder.flush()
    clock[0] = 1010.5
    for _ in range(3 * RESERVOIR):
        recorder.itl(MODEL, 0.02)
    recorder.flush()
    t = read_traffic(store, MODEL, window_s=10, now=1010.9)  # whole seconds 1000..1009
    assert t.arrival_rate == pytest.approx(3.0)
    assert t.ttft_p95_s == pytest.approx(0.095) and t.itl_p95_s == pytest.approx(0.02)
    # ITL samples were thinned to the reservoir; the 0.5 s one is outside a short window.
    assert store.r.llen(recorder.keys.latencies(MODEL, "itl")) == RESERVOIR + 1
    short = read_traffic(store, MODEL, window_s=5, now=1011.0)
    assert short.itl_p95_s == pytest.approx(0.02) and short.ttft_p95_s is None
    assert short.arrival_rate == pytest.approx(3 * 4 / 5)  # seconds 1006..1010: 1010 had none
    quiet = read_traffic(store, "quiet", window_s=10, now=1010.9)  # no router records it: not measured
    assert (quiet.arrival_rate, quiet.ttft_p95_s, quiet.itl_p95_s) == (None, None, None)
