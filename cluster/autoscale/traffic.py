"""Arrival rate and recent TTFT / ITL percentiles per model, shared through Redis.

Routers see arrivals and latencies; the autoscaler leader needs them for every router together. A
router keeps a `TrafficRecorder`, tells it about each request (`arrival`, `ttft`, `itl`) and calls
`flush()` now and then (its discovery poll is a natural place): one pipelined round trip writes the
arrivals into per-second counters (`INCRBY`, expiring after the look-back window) and the latency
samples into capped lists of "time value" strings. ITL samples are thinned to a reservoir per flush,
so a router streaming thousands of tokens a second writes a bounded amount.

`read_traffic` sums the counters of the last `window_s` seconds (a rate) and takes the P95 of the
samples younger than the window (None when there are none).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.autoscale.keys import AutoscaleKeys
from cluster.state.store import StateStore

MAX_SAMPLES = 2000  # per model and kind, in Redis
RESERVOIR = 200  # per model and kind, per flush
COUNTER_TTL_S = 300  # longer than any sensible look-back window


@dataclass
class _Samples:
    seen: int = 0
    kept: list[tuple[float, float]] = field(default_factory=list)

    def add(self, at: float, value: float) -> None:
        self.seen += 1
        if len(self.kept) < RESERVOIR:
            self.kept.append((at, value))
        else:  # reservoir sampling: every sample of the interval equally likely to be kept
            i = random.randrange(self.seen)
            if i < RESERVOIR:
                self.kept[i] = (at, value)


class TrafficRecorder:
    """A router's buffer of observations; not thread-safe (one event loop calls it)."""

    def __init__(self, store: StateStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.keys = AutoscaleKeys(store.keys.prefix)
        self._clock = clock
        self._arrivals: dict[tuple[str, int], int] = {}
        self._samples: dict[tuple[str, str], _Samples] = {}

    def arrival(self, model: str) -> None:
        key = (model, int(self._clock()))
        self._arrivals[key] = self._arrivals.get(key, 0) + 1

    def ttft(self, model: str, seconds: float) -> None:
        self._sample(model, "ttft", seconds)

    def itl(self, model: str, seconds: float) -> None:
        self._sample(model, "itl", seconds)

    def _sample(self, model: str, kind: str, seconds: float) -> None:
        self._samples.setdefault((model, kind), _Samples()).add(self._clock(), seconds)

    def flush(self) -> None:
        """Write what was observed since the last flush. On a Redis error it raises and keeps what it
        could not write for the next flush (a slow Redis under load must not erase the arrival rate)."""
        arrivals, samples = self._arrivals, self._samples
        self._arrivals, self._samples = {}, {}
        if not arrivals and not samples:
            return
        try:
            self._write(arrivals, samples)
        except Exception:
            for key, n in arrivals.items():
                self._arrivals[key] = self._arrivals.get(key, 0) + n
            for key, kept in samples.items():
                merged = self._samples.setdefault(key, _Samples())
                for at, value in kept.kept:
                    merged.add(at, value)
            raise

    def _write(self, arrivals: dict[tuple[str, int], int], samples: dict[tuple[str, str], _Samples]) -> None:
        with self.store.r.pipeline(transaction=False) as p:
            for (model, second), n in arrivals.items():
                key = self.keys.arrivals(model, second)
                p.incrby(key, n)
                p.expire(key, COUNTER_TTL_S)
            for (model, kind), s in samples.items():
                key = self.keys.latencies(model, kind)
                p.lpush(key, *(f"{at:.3f} {value:.6f}" for at, value in s.kept))
                p.ltrim(key, 0, MAX_SAMPLES - 1)
                p.expire(key, COUNTER_TTL_S)
            p.execute()


@dataclass(frozen=True)
class Traffic:
    arrival_rate: float | None  # requests/s over the window; None when no router records arrivals
    ttft_p95_s: float | None
    itl_p95_s: float | None


def read_traffic(store: StateStore, model: str, window_s: float, now: float | None = None) -> Traffic:
    keys = AutoscaleKeys(store.keys.prefix)
    now = time.time() if now is None else now
    # Whole seconds strictly before this one: the current second is still filling.
    last = int(now) - 1
    seconds = list(range(last - max(int(window_s), 1) + 1, last + 1))
    with store.r.pipeline(transaction=False) as p:
        p.mget([keys.arrivals(model, s) for s in seconds])
        p.lrange(keys.latencies(model, "ttft"), 0, MAX_SAMPLES - 1)
        p.lrange(keys.latencies(model, "itl"), 0, MAX_SAMPLES - 1)
        counts, ttft, itl = p.execute()
    has_counts = any(c is not None for c in counts)
    rate = sum(int(c) for c in counts if c is not None) / len(seconds) if has_counts else None
    return Traffic(rate, _p95(ttft, now - window_s), _p95(itl, now - window_s))


def _p95(samples: list[str], since: float) -> float | None:
    values = sorted(float(v) for at, v in (s.split() for s in samples) if float(at) >= since)
    if not values:
        return None
    return values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]
