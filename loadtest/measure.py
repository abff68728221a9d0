"""Per-request records → a run's figures, as vLLM's benchmark computes them (so the two read the same).

- TTFT, TPOT and E2E: one value per completed request (TPOT only where more than one token came);
  ITL: every gap of every completed request, pooled. Each as mean, std, min, P50/P90/P95/P99 (numpy's
  linear interpolation, as vLLM), max, in seconds.
- Throughput over the run's duration (start → last request done): completed requests/s, output
  tokens/s, input tokens/s and their sum. Tokens are the server's usage counts where it sent them.
- Goodput under an SLO: completed requests/s whose every bounded figure (TTFT, TPOT, E2E) is within
  its bound; a one-token request has no TPOT and so meets a TPOT bound.
- Failures by type, and cut requests (still running when the run's time was up) apart from both.
- Peak concurrency (requests in flight) and peak output throughput (the busiest one-second bucket).
- Client lag: how late each request was written against its arrival time (open loop), and the
  client's CPU over the run as a share of one core: a large lag, or a share near 1, says the client,
  not the server, set the pace (its event loop stamps chunks late and bunches them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.record import RequestRecord

PERCENTILES = (50, 90, 95, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2e")
SLO_KEYS = ("ttft", "tpot", "e2e")


def distribution(values: list[float]) -> dict[str, float | int | None]:
    keys = ("mean", "std", "min", *(f"p{p}" for p in PERCENTILES), "max")
    if not values:
        return {"n": 0, **dict.fromkeys(keys)}
    a = np.asarray(values, dtype=float)
    out: dict[str, Any] = {"n": len(a), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(a, p))
    out["max"] = float(a.max())
    return out


@dataclass(frozen=True)
class SLO:
    """Bounds in seconds; None: not bounded."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    def __post_init__(self) -> None:
        for name in SLO_KEYS:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"slo {name} must be > 0 seconds, got {value}")
        if all(getattr(self, name) is None for name in SLO_KEYS):
            raise ValueError(f"slo needs at least one bound of {', '.join(SLO_KEYS)}")

    @classmethod
    def parse(cls, text: str) -> SLO:
        """`ttft=0.5,tpot=0.05,e2e=10` in seconds; a value may end in `ms` or `s`."""
        bounds: dict[str, float] = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            name, sep, value = part.partition("=")
            name = name.strip().lower()
            if not sep or name not in SLO_KEYS:
                raise ValueError(f"slo: expected NAME=SECONDS with NAME in {', '.join(SLO_KEYS)}, got {part!r}")
            value = value.strip().lower()
            scale = 1e-3 if value.endswith("ms") else 1.0
            try:
                bounds[name] = float(value.removesuffix("ms").removesuffix("s")) * scale
            except ValueError:
                raise ValueError(f"slo {name}: not a number of seconds: {value!r}") from None
        return cls(**bounds)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in SLO_KEYS if getattr(self, name) is not None}

    def is_met(self, record: RequestRecord) -> bool:
        if not record.is_ok:
            return False
        figures = {"ttft": record.ttft, "tpot": record.tpot, "e2e": record.e2e}
        # Only TPOT is ever None on a completed request (one token): nothing to bound.
        return all(figures[name] is None or figures[name] <= bound for name, bound in self.as_dict().items())


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO | None = None,
              client_cpu_s: float | None = None) -> dict[str, Any]:
    done = [r for r in records if r.is_ok]
    failed = [r for r in records if r.error is not None]
    num_in = sum(r.num_input_tokens or 0 for r in done)
    num_out = sum(r.num_output_tokens for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    out: dict[str, Any] = {
        "num_requests": len(records),
        "num_completed": len(done),
        "num_failed": len(failed),
        "num_cut": sum(1 for r in records if r.is_cut),
        "errors_by_type": dict(sorted(Counter(r.error for r in failed).items())),
        "duration_s": duration_s,
        "num_input_tokens": num_in,
        "num_output_tokens": num_out,
        "output_tokens_from": dict(sorted(Counter(r.output_tokens_from for r in done).items())),
        "request_throughput": per_s(len(done)),
        "input_throughput": per_s(num_in),
        "output_throughput": per_s(num_out),
        "total_token_throughput": per_s(num_in + num_out),
        "ttft": distribution([r.ttft for r in done]),
        "tpot": distribution([r.tpot for r in done if r.tpot is not None]),
        "itl": distribution([gap for r in done for gap in r.itl]),
        "e2e": distribution([r.e2e for r in done]),
        "client_lag": distribution([max(0.0, r.start - r.scheduled) for r in records]),
        "peak_concurrency": peak_concurrency(done),
        "peak_output_throughput": peak_output_throughput(done),
        "client_cpu_share": None if client_cpu_s is None or duration_s <= 0 else client_cpu_s / duration_s,
        "goodput": None,
    }
    if slo is not None:
        num_good = sum(1 for r in done if slo.is_met(r))
        out["goodput"] = {"slo": slo.as_dict(), "num_good": num_good, "requests_per_s": per_s(num_good),
                          "fraction": num_good / len(records) if records else 0.0}
    return out


def peak_concurrency(records: list[RequestRecord]) -> int:
    """Most requests in flight at once, from their send and end times."""
    events = sorted([(r.start, 1) for r in records if r.end is not None]
                    + [(r.start + r.end, -1) for r in records if r.end is not None])
    now = peak = 0
    for _, step in events:  # at equal times an end (-1) sorts first: back-to-back is not overlap
        now += step
        peak = max(peak, now)
    return peak


def peak_output_throughput(records: list[RequestRecord]) -> float:
    """The most output in any one-second bucket of the run, as vLLM's "peak output token throughput":
    each output chunk counts its tokens where the API says (gRPC), else one (as vLLM counts them)."""
    if not records:
        return 0.0
    first = min(r.start for r in records)
    buckets: Counter[int] = Counter()
    for r in records:
        sizes = r.chunk_tokens if len(r.chunk_tokens) == len(r.chunk_times) else [1] * len(r.chunk_times)
        for at, size in zip(r.chunk_times, sizes, strict=True):
            buckets[int(r.start + at - first)] += size
    return float(max(buckets.values(), default=0))
