"""When requests are sent.

Open loop (the server's speed does not slow the sender down):
- `poisson`: exponential gaps, mean 1/rate.
- `gamma`: gamma gaps with mean 1/rate and shape `burstiness` (scale 1/(rate·burstiness)), as vLLM's
  benchmark draws them: burstiness 1 is Poisson, below 1 burstier (clumps and lulls; the gaps'
  coefficient of variation is 1/sqrt(burstiness)), above 1 more regular.
- `constant`: exactly 1/rate apart.
As vLLM's benchmark does, random gaps are rescaled so that they add up to exactly (n-1)/rate: the
offered rate is the asked one whatever the seed (unscaled, a few hundred requests miss it by a few
per cent, and throughputs from two seeds would differ by that much). A rate of inf sends everything
at once. `max_concurrency` may cap the requests in flight on top
(a request due while the cap is full waits for a slot, and its wait shows as client lag).

Closed loop (`concurrency` N): N users, each sending its next request as soon as its last one ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("poisson", "gamma", "constant", "closed")


@dataclass(frozen=True)
class Arrival:
    kind: str = "poisson"
    rate: float = math.inf  # requests per second (open loop)
    burstiness: float = 1.0  # gamma's shape
    concurrency: int = 0  # closed loop: users
    max_concurrency: int = 0  # open loop: cap on requests in flight (0 = none)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"arrival must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 (inf: all at once), got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a finite number > 0, got {self.burstiness}")
        if self.kind == "closed" and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 for a closed loop, got {self.concurrency}")
        if self.kind != "closed" and self.concurrency:
            raise ValueError("concurrency is for the closed loop only (use max_concurrency to cap an open loop)")
        if self.max_concurrency < 0:
            raise ValueError(f"max_concurrency must be >= 0, got {self.max_concurrency}")

    @property
    def is_closed(self) -> bool:
        return self.kind == "closed"

    def times(self, rng: np.random.Generator, n: int) -> list[float]:
        """Send times of n open-loop requests, seconds from the run's start; the first at 0."""
        if self.is_closed:
            raise ValueError("a closed loop has no send times: each user sends when its last request ends")
        if n <= 0:
            return []
        if math.isinf(self.rate):
            return [0.0] * n
        if self.kind == "constant":
            gaps = np.full(n - 1, 1.0 / self.rate)
        elif self.kind == "poisson":
            gaps = rng.exponential(1.0 / self.rate, size=n - 1)
        else:
            gaps = rng.gamma(self.burstiness, 1.0 / (self.rate * self.burstiness), size=n - 1)
        if n > 1 and gaps.sum() > 0:
            gaps *= (n - 1) / self.rate / gaps.sum()
        return [0.0, *np.cumsum(gaps).tolist()]

    def describe(self) -> str:
        if self.is_closed:
            return f"closed loop, {self.concurrency} users"
        text = f"{self.kind}, rate {self.rate:g}/s"
        if self.kind == "gamma":
            text += f", burstiness {self.burstiness:g}"
        return text + (f", at most {self.max_concurrency} in flight" if self.max_concurrency else "")
