"""Token-length distributions for prompts and outputs, written as short specs on the command line:

    256                  fixed: always 256 (also `fixed:256`)
    uniform:128:512      uniform integers in [128, 512]
    normal:256:64        normal with mean 256 and standard deviation 64
    lognormal:256:0.8    lognormal with MEAN 256 (not median) and log-space sigma 0.8: a long right tail

Every sample is rounded and clipped to [minimum, maximum] (at least 1 token). Sampling takes a numpy
Generator, so a seeded run draws the same lengths every time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("fixed", "uniform", "normal", "lognormal")


@dataclass(frozen=True)
class LengthDist:
    kind: str
    a: float  # fixed: the length; uniform: low; normal / lognormal: the mean
    b: float = 0.0  # uniform: high; normal: standard deviation; lognormal: log-space sigma
    minimum: int = 1
    maximum: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.minimum < 1:
            raise ValueError(f"minimum must be >= 1, got {self.minimum}")
        if self.maximum is not None and self.maximum < self.minimum:
            raise ValueError(f"maximum must be >= minimum ({self.minimum}), got {self.maximum}")
        if self.kind == "fixed" and (self.a < 1 or self.a != int(self.a)):
            raise ValueError(f"a fixed length must be an integer >= 1, got {self.a}")
        if self.kind == "uniform" and not 1 <= self.a <= self.b:
            raise ValueError(f"uniform bounds must satisfy 1 <= low <= high, got {self.a}:{self.b}")
        if self.kind in ("normal", "lognormal") and (self.a <= 0 or self.b < 0):
            raise ValueError(f"{self.kind} needs a mean > 0 and a spread >= 0, got {self.a}:{self.b}")

    @classmethod
    def parse(cls, spec: str | int, name: str = "length", maximum: int | None = None) -> LengthDist:
        """`spec` as in the module docstring; errors name `name` (the flag the spec came from)."""
        text = str(spec).strip()
        parts = text.split(":")
        kind = "fixed" if len(parts) == 1 else parts[0]
        numbers = parts if len(parts) == 1 else parts[1:]
        need = 1 if kind == "fixed" else 2
        try:
            if kind not in KINDS or len(numbers) != need:
                raise ValueError("expected N, fixed:N, uniform:LO:HI, normal:MEAN:STD or lognormal:MEAN:SIGMA")
            values = [float(x) for x in numbers]
            return cls(kind, *values, maximum=maximum)
        except ValueError as exc:
            raise ValueError(f"{name}: bad length spec {text!r}: {exc}") from None

    @property
    def mean(self) -> float:
        """The distribution's mean before clipping."""
        return {"fixed": self.a, "uniform": (self.a + self.b) / 2}.get(self.kind, self.a)

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        if self.kind == "fixed":
            raw = np.full(n, self.a)
        elif self.kind == "uniform":
            raw = rng.integers(int(self.a), int(self.b), endpoint=True, size=n)
        elif self.kind == "normal":
            raw = rng.normal(self.a, self.b, size=n)
        else:  # the mean, not the median, is what a user asks for: mu = ln(mean) - sigma^2 / 2
            raw = rng.lognormal(math.log(self.a) - self.b**2 / 2, self.b, size=n)
        clipped = np.clip(np.rint(raw), self.minimum, self.maximum if self.maximum is not None else np.inf)
        return [int(x) for x in clipped]

    def describe(self) -> str:
        if self.kind == "fixed":
            text = str(int(self.a))
        else:
            text = f"{self.kind}:{self.a:g}:{self.b:g}"
        return text if self.maximum is None else f"{text} (max {self.maximum})"
