"""Router-side request metrics (cluster/metrics.py), observed in the request path at little cost.

A request's life here: `RequestMetrics(model)` at arrival (the model's labelled children are looked up
once per model and kept, not per request or per token) → `tokens(n)` per event from the workers: the
first event with tokens observes TTFT, each later one the gap since the previous (ITL) → `finish`
once, with the outcome, prompt and completion token counts, and the end-to-end latency. A request
refused before it ran calls `finish` with its error's outcome (`outcome_of`) and no tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

from cluster import metrics
from cluster.router.errors import APIError

# Outcomes besides the finish reasons (stop, length, abort): what an error status says happened.
_OUTCOMES = {400: "invalid", 401: "unauthorized", 404: "invalid", 413: "invalid", 415: "invalid",
             429: "rejected", 503: "unavailable"}


def outcome_of(error: APIError) -> str:
    return _OUTCOMES.get(error.status, "error")


@dataclass
class _Children:
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter


_CHILDREN: dict[str, _Children] = {}


def _children(model: str) -> _Children:
    children = _CHILDREN.get(model)
    if children is None:
        children = _CHILDREN[model] = _Children(
            metrics.TIME_TO_FIRST_TOKEN.labels(model), metrics.INTER_TOKEN_LATENCY.labels(model),
            metrics.E2E_REQUEST_LATENCY.labels(model), metrics.PROMPT_TOKENS.labels(model),
            metrics.GENERATION_TOKENS.labels(model))
    return children


if TYPE_CHECKING:
    from cluster.autoscale.traffic import TrafficRecorder


class RequestMetrics:
    """One request's timings. `model` is "" until the model is known (an unknown name is never a label)."""

    __slots__ = ("_arrival", "_children", "_last", "_done", "_traffic", "model")

    def __init__(self, traffic: TrafficRecorder | None = None) -> None:
        self._arrival = time.perf_counter()
        self._last: float | None = None
        self._children: _Children | None = None
        self._done = False
        self._traffic = traffic  # the autoscaler's signals (arrival rate, TTFT/ITL), through Redis
        self.model = ""

    def set_model(self, model: str) -> None:
        self.model = model
        self._children = _children(model)
        if self._traffic is not None:
            self._traffic.arrival(model)

    def tokens(self, num_tokens: int) -> None:
        """An event from the workers carrying `num_tokens` new tokens (any choice)."""
        if not num_tokens or self._children is None:
            return
        now = time.perf_counter()
        if self._last is None:
            self._children.ttft.observe(now - self._arrival)
            if self._traffic is not None:
                self._traffic.ttft(self.model, now - self._arrival)
        else:
            self._children.itl.observe(now - self._last)
            if self._traffic is not None:
                self._traffic.itl(self.model, now - self._last)
        self._last = now

    def finish(self, outcome: str, num_prompt_tokens: int = 0, num_completion_tokens: int = 0) -> None:
        """Count the request once, under `outcome` (a finish reason, or `outcome_of` an error)."""
        if self._done:
            return
        self._done = True
        metrics.REQUESTS.labels(self.model, outcome).inc()
        if self._children is None or self._last is None:
            return  # never produced a token: no latency to report
        self._children.e2e.observe(self._last - self._arrival)
        self._children.prompt_tokens.inc(num_prompt_tokens)
        self._children.generation_tokens.inc(num_completion_tokens)
