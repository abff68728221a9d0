"""P/D selection: which prefill worker P and which decode worker D serve one request.

A request here: dispatch.py hands `RoutingPolicy.select` a snapshot of the model's live workers, each
a `Candidate` (its load, its free KV blocks, how many of this prompt's leading tokens it has cached)
→ the decode policy picks D → if the part of the prompt D has not cached is shorter than
`min_prefill_tokens`, D prefills it itself and P is None (conditional disaggregation); so it is when
the model has no prefill worker live → otherwise the prefill policy picks P. Nothing here does I/O:
the snapshot is built by the caller, so every policy is a pure function of it (plus a turn counter
that spreads ties).

Policies (names as in the config, RouterConfig.prefill_policy / decode_policy):
- round_robin: each worker in turn, whatever its load.
- least_loaded: the fewest requests (published running + waiting, plus what this router sent it
  since that report); ties go round the workers.
- prefix_aware: the most cached prompt tokens minus `weight` x load, so a hot prefix draws requests
  to the worker that holds it only until that worker is `cached / weight` requests busier than the
  others; ties → least loaded.
- kv_aware (decode only): the most free KV blocks, net of what this router's requests since the
  report may take; ties → least loaded. A worker that has not reported yet ranks last.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.router.config import DECODE_POLICIES, PREFILL_POLICIES


@dataclass(frozen=True)
class Candidate:
    """One worker as a policy sees it, for one request."""

    worker_id: str
    load: float = 0.0  # requests on it (running + waiting), as fresh as this router can tell
    free_blocks: int | None = None  # free KV blocks net of this router's recent reservations; None: unknown
    cached_tokens: int = 0  # leading prompt tokens it has in its prefix cache


@dataclass(frozen=True)
class RouteRequest:
    num_prompt_tokens: int
    max_tokens: int = 0
    min_prefill_tokens: int = 0  # conditional disaggregation: fewer uncached tokens stay on D


class Picker(ABC):
    """Chooses one worker of one role."""

    needs_prefix = False  # whether candidates must carry cached_tokens (a prefix-index lookup)

    def __init__(self) -> None:
        self._turns = itertools.count()

    def pick(self, candidates: Sequence[Candidate], req: RouteRequest) -> Candidate:
        if not candidates:
            raise ValueError("no candidates to pick from")
        start = next(self._turns) % len(candidates)
        # Rotating the start makes min() break ties in turn rather than always on the first worker.
        rotated = [*candidates[start:], *candidates[:start]]
        return min(rotated, key=self.key)

    @abstractmethod
    def key(self, c: Candidate) -> tuple:
        """Smaller is better."""


class RoundRobin(Picker):
    def key(self, c: Candidate) -> tuple:
        return ()


class LeastLoaded(Picker):
    def key(self, c: Candidate) -> tuple:
        return (c.load,)


class PrefixAware(Picker):
    needs_prefix = True

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def key(self, c: Candidate) -> tuple:
        return (-(c.cached_tokens - self.weight * c.load), c.load)


class KVAware(Picker):
    def key(self, c: Candidate) -> tuple:
        return (c.free_blocks is None, -(c.free_blocks or 0), c.load)


class RoutingPolicy:
    """A prefill picker and a decode picker: `select(prefill_workers, decode_workers, req) -> (P, D)`."""

    def __init__(self, prefill: Picker, decode: Picker) -> None:
        self.prefill = prefill
        self.decode = decode

    @property
    def needs_prefix(self) -> bool:
        return self.prefill.needs_prefix or self.decode.needs_prefix

    def select(self, prefill_workers: Sequence[Candidate], decode_workers: Sequence[Candidate],
               req: RouteRequest) -> tuple[Candidate | None, Candidate]:
        """P is None when D prefills the prompt itself."""
        d = self.decode.pick(decode_workers, req)
        if not prefill_workers or req.num_prompt_tokens - d.cached_tokens < req.min_prefill_tokens:
            return None, d
        return self.prefill.pick(prefill_workers, req), d


def make_picker(name: str, field: str, allowed: Sequence[str], prefix_load_weight: float = 64.0) -> Picker:
    if name not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(allowed)}; got {name!r}")
    if name == "prefix_aware":
        return PrefixAware(prefix_load_weight)
    return {"round_robin": RoundRobin, "least_loaded": LeastLoaded, "kv_aware": KVAware}[name]()


def make_policy(prefill_policy: str = "round_robin", decode_policy: str = "round_robin",
                prefix_load_weight: float = 64.0) -> RoutingPolicy:
    """Policies by their config names; an unknown name is a ValueError naming the field."""
    return RoutingPolicy(make_picker(prefill_policy, "prefill_policy", PREFILL_POLICIES, prefix_load_weight),
                         make_picker(decode_policy, "decode_policy", DECODE_POLICIES, prefix_load_weight))
