"""`--sweep rate=1,2,4,8`: the workload run once per value of one arrival setting, in order, for a
latency-vs-throughput curve (loadtest/plots.py plot_sweep). Each point draws the same distributions
with prompts of its own (seed + point index): with the same prompts, a prefix cache would serve the
later points from the earlier ones.

Sweepable: `rate` (open loop, requests/s; `inf` allowed), `concurrency` (closed-loop users),
`max_concurrency` (a cap on an open loop) and `burstiness` (gamma arrivals).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from loadtest.arrival import Arrival

PARAMS = ("rate", "concurrency", "max_concurrency", "burstiness")


@dataclass(frozen=True)
class Sweep:
    param: str
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.param not in PARAMS:
            raise ValueError(f"sweep: the swept setting must be one of {', '.join(PARAMS)}, got {self.param!r}")
        if not self.values:
            raise ValueError("sweep: no values")
        if self.param != "rate" and any(math.isinf(v) for v in self.values):
            raise ValueError(f"sweep: {self.param} cannot be inf")
        if self.param in ("concurrency", "max_concurrency") and any(v != int(v) or v < 1 for v in self.values):
            raise ValueError(f"sweep: {self.param} values must be integers >= 1")

    @classmethod
    def parse(cls, text: str) -> Sweep:
        param, sep, values = text.partition("=")
        param = param.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"sweep: expected NAME=V1,V2,... (e.g. rate=1,2,4,8), got {text!r}")
        try:
            numbers = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"sweep: values must be numbers, got {values!r}") from None
        return cls(param, numbers)

    def label(self, value: float) -> str:
        return f"{self.param}={value:g}"

    def arrival(self, base: Arrival, value: float) -> Arrival:
        """`base` with the swept setting at `value` (a concurrency sweep makes it a closed loop)."""
        if self.param == "concurrency":
            return dataclasses.replace(base, kind="closed", rate=math.inf, concurrency=int(value), max_concurrency=0)
        if self.param == "max_concurrency":
            return dataclasses.replace(base, max_concurrency=int(value))
        if self.param == "burstiness":
            return dataclasses.replace(base, burstiness=value)
        if base.is_closed:
            raise ValueError("sweep: a rate sweep needs an open-loop arrival (poisson, gamma or constant)")
        return dataclasses.replace(base, rate=value)

    def param_value(self, value: float) -> float | int:
        return int(value) if self.param in ("concurrency", "max_concurrency") else value
