"""Prometheus metrics, named as shared/DESIGN.md's conventions say: prefix `pdserve:`, vLLM's names
where the meaning is the same, labels `model`, `pool`, `worker`.

Router-side metrics are observed where the event happens (a request admitted, a first token sent).
Worker-side figures (running/waiting requests, KV usage, prefix hits, KV transfer bytes and
fallbacks) reach the router's `/metrics` through the load reports workers publish to Redis: a
`WorkerFiguresCollector` turns the latest reports into gauges and counters at scrape time, so the
router never polls workers on the scrape path.

Everything lives in `REGISTRY`, not prometheus_client's global one, so tests and several apps in one
process do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)

# --- router: requests --------------------------------------------------------------------------
REQUESTS = Counter("pdserve:requests", "Requests the router finished, by outcome",
                   ["model", "status"], registry=REGISTRY)  # exposed as pdserve:requests_total
TIME_TO_FIRST_TOKEN = Histogram("pdserve:time_to_first_token_seconds", "Router-side time to first token",
                                ["model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
INTER_TOKEN_LATENCY = Histogram("pdserve:inter_token_latency_seconds", "Gaps between streamed chunks",
                                ["model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
E2E_REQUEST_LATENCY = Histogram("pdserve:e2e_request_latency_seconds", "Request latency, arrival to last token",
                                ["model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
PROMPT_TOKENS = Counter("pdserve:prompt_tokens", "Prompt tokens of finished requests", ["model"],
                        registry=REGISTRY)
GENERATION_TOKENS = Counter("pdserve:generation_tokens", "Generated tokens", ["model"], registry=REGISTRY)

# --- router: admission and routing --------------------------------------------------------------
QUEUE_DEPTH = Gauge("pdserve:queue_depth", "Requests waiting in this router's admission queue",
                    ["model", "pool"], registry=REGISTRY)
REQUESTS_IN_FLIGHT = Gauge("pdserve:router_requests_in_flight", "Requests this router is serving now",
                           ["model"], registry=REGISTRY)
REJECTED = Counter("pdserve:requests_rejected", "Requests refused before reaching a worker, by reason",
                   ["model", "reason"], registry=REGISTRY)
ROUTED = Counter("pdserve:requests_routed", "Requests sent to each worker", ["model", "pool", "worker"],
                 registry=REGISTRY)
SPILLED = Counter("pdserve:requests_spilled", "Requests served by a spill-over model", ["model", "to_model"],
                  registry=REGISTRY)


# --- autoscaler (cluster/autoscale/controller.py); pdserve:pool_replicas comes from worker figures below -----
POOL_DESIRED_REPLICAS = Gauge("pdserve:pool_desired_replicas", "Replicas the autoscaler wants for a pool",
                              ["model", "pool"], registry=REGISTRY)
AUTOSCALER_DECISIONS = Counter("pdserve:autoscaler_decisions", "Autoscaler decisions, by direction and reason",
                               ["model", "pool", "direction", "reason"], registry=REGISTRY)


@dataclass(frozen=True)
class WorkerFigures:
    """One worker's latest published figures (from its load report in Redis)."""

    worker: str
    model: str
    pool: str  # role: prefill | decode | unified | simulated
    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_cache_hits: int = 0
    prefix_cache_queries: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_fallbacks: int = 0


class WorkerFiguresCollector:
    """Exposes worker figures at scrape time; `read` returns the latest snapshot (no I/O on scrape
    is required of it, but it may do some)."""

    def __init__(self, read: Callable[[], Iterable[WorkerFigures]]) -> None:
        self._read = read

    def collect(self):
        labels = ["model", "pool", "worker"]
        running = GaugeMetricFamily("pdserve:num_requests_running", "Requests running on a worker", labels=labels)
        waiting = GaugeMetricFamily("pdserve:num_requests_waiting", "Requests waiting on a worker", labels=labels)
        usage = GaugeMetricFamily("pdserve:kv_cache_usage_perc", "KV-cache usage, 0..1", labels=labels)
        hits = CounterMetricFamily("pdserve:prefix_cache_hits", "Prefix-cache hits (tokens)", labels=labels)
        queries = CounterMetricFamily("pdserve:prefix_cache_queries", "Prefix-cache queries (tokens)", labels=labels)
        moved = CounterMetricFamily("pdserve:kv_transfer_bytes", "KV bytes received", labels=labels)
        fallbacks = CounterMetricFamily("pdserve:kv_transfer_fallbacks",
                                        "KV transfers that failed and were recomputed", labels=labels)
        replicas: dict[tuple[str, str], int] = {}
        for f in self._read():
            values = [f.model, f.pool, f.worker]
            running.add_metric(values, f.num_running)
            waiting.add_metric(values, f.num_waiting)
            usage.add_metric(values, f.kv_usage)
            hits.add_metric(values, f.prefix_cache_hits)
            queries.add_metric(values, f.prefix_cache_queries)
            moved.add_metric(values, f.kv_transfer_bytes)
            fallbacks.add_metric(values, f.kv_transfer_fallbacks)
            replicas[(f.model, f.pool)] = replicas.get((f.model, f.pool), 0) + 1
        pool_replicas = GaugeMetricFamily("pdserve:pool_replicas", "Live workers per pool", labels=["model", "pool"])
        for (model, pool), n in sorted(replicas.items()):
            pool_replicas.add_metric([model, pool], n)
        yield from (running, waiting, usage, hits, queries, moved, fallbacks, pool_replicas)
