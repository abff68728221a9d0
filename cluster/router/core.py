"""The Router: what the HTTP and gRPC front ends call between parsing a request and streaming it.

A request here: the front end calls `resolve(model, prompt=... | messages=..., max_tokens, priority)`
→ the name becomes a served model (models.py: plain name, alias, or the `auto` rules on the prompt,
counted with the auto default model's tokenizer) → spill-over when that model's admission queue is
full (or it has no worker) and its spill-over model has room → the prompt is tokenized with the
serving model's tokenizer (its chat template for messages) and checked against its context → a
`Route`. The front end runs `text_events(route, ...)`, which calls `Route.generate`: admission
(admission.py: no worker → 503; queue full → 429 with Retry-After; else in flight, possibly after
waiting in the queue) → the model's pool picks P and D (policy.py over discovery.py's view of the
workers) and streams the tokens (dispatch.py) → the slot is released when the stream ends, however
it ends. `route.name` is the model that served: responses name it.

`Router.from_pools(pools)` is the static case: the given addresses, no Redis, no aliases, no cap;
`Router.from_config(pools, config, redis_url=...)` the cluster's.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import aclosing
from typing import Any

from cluster.autoscale.traffic import TrafficRecorder
from cluster.metrics import (
    QUEUE_DEPTH,
    REJECTED,
    REQUESTS_IN_FLIGHT,
    SPILLED,
    WorkerFigures,
    WorkerFiguresCollector,
)
from cluster.metrics import REGISTRY as METRICS_REGISTRY
from cluster.request import SamplingParams
from cluster.router.admission import Admission, IsGone
from cluster.router.config import RouterConfig
from cluster.router.discovery import Discovery
from cluster.router.dispatch import ModelPool
from cluster.router.errors import bad_request, unavailable
from cluster.router.models import ModelRouter
from cluster.router.policy import make_policy
from cluster.router.textgen import chat_prompt_token_ids, prompt_token_ids
from cluster.state import StateStore


class Route:
    """One request's serving model and prompt token ids; `text_events` runs it like a pool."""

    def __init__(self, router: Router, pool: ModelPool, prompt_ids: list[int], requested: str, priority: int,
                 is_gone: IsGone | None) -> None:
        self.router = router
        self.pool = pool
        self.prompt_ids = prompt_ids
        self.requested = requested  # the name the client sent (an alias, `auto`, or the model)
        self.priority = priority
        self.is_gone = is_gone

    @property
    def name(self) -> str:
        """The model that serves the request."""
        return self.pool.name

    @property
    def tokenizer(self):
        return self.pool.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.pool.max_model_len

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator:
        """The pool's stream, once admitted; the admission slot is held until it ends."""
        if not self.pool.is_ready:
            REJECTED.labels(model=self.name, reason="no_worker").inc()
            raise unavailable(f"no worker serves model {self.name!r}")
        admission = self.router.admission[self.name]
        await admission.acquire(self.priority, self.is_gone)
        try:
            # aclosing: closing this stream closes the worker calls (and their in-flight counts) now
            async with aclosing(self.pool.generate(request_id, prompt_ids, params)) as items:
                async for item in items:
                    yield item
        finally:
            admission.release()


class Router:
    def __init__(self, pools: Mapping[str, ModelPool], config: RouterConfig | None = None,
                 store: StateStore | None = None, model_aliases: Mapping[str, Collection[str]] | None = None,
                 router_id: str | None = None, owns_store: bool = False) -> None:
        self.config = config or RouterConfig()
        self.pools = dict(pools)
        self.models = ModelRouter(self.pools, self.config, model_aliases)
        self.router_id = router_id or f"router-{uuid.uuid4().hex[:12]}"
        self.store = store
        self._owns_store = owns_store
        # Arrivals and TTFT/ITL samples for the autoscaler, flushed to Redis with each discovery poll.
        self.traffic = TrafficRecorder(store) if store is not None else None
        self.discovery = Discovery(store, {name: pool.workers for name, pool in self.pools.items()}, self.router_id,
                                   self.config.poll_interval_s, self.queue_depths, self._pump,
                                   on_poll=self.traffic.flush if self.traffic is not None else None)
        self.admission: dict[str, Admission] = {}
        self._depth_pools: dict[str, set[str]] = {}  # every pool a model's depth was ever reported for
        self._shown: dict[str, tuple[int, int]] = {}  # (queued, in flight) this router added to the gauges
        for name, pool in self.pools.items():
            pool.policy = make_policy(self.config.prefill_policy, self.config.decode_policy,
                                      self.config.prefix_load_weight)
            if store is not None:
                pool.cached_tokens = self.discovery.cached_tokens
            self.admission[name] = Admission(name, self.config.admission, pool.workers.max_num_seqs,
                                             self._admission_changed)
            self._admission_changed(self.admission[name])
        self._started = False
        self._collector: WorkerFiguresCollector | None = None

    @classmethod
    def from_pools(cls, pools: Mapping[str, ModelPool]) -> Router:
        """Static addresses, default policies, no Redis."""
        return cls(pools)

    @classmethod
    def from_config(cls, pools: Mapping[str, ModelPool], config: RouterConfig | dict[str, Any] | None = None,
                    redis_url: str | None = None, aliases: Mapping[str, Collection[str]] | None = None) -> Router:
        """The cluster's router: `config` is the `router` section (a RouterConfig or its mapping);
        with `redis_url`, workers, loads and the prefix index come from Redis."""
        store = StateStore.from_url(redis_url) if redis_url else None
        try:
            return cls(pools, RouterConfig.from_dict(config), store, aliases, owns_store=store is not None)
        except BaseException:
            if store is not None:
                store.close()
            raise

    def names(self) -> list[str]:
        """Every model name and alias a request may use."""
        return self.models.names()

    async def start(self) -> None:
        """Read the registry once and start polling it (no-op without Redis, or when started)."""
        if not self._started:
            self._started = True
            await self.discovery.start()
            if self.store is not None:  # worker figures come from their load reports in Redis
                self._collector = WorkerFiguresCollector(self.worker_figures)
                METRICS_REGISTRY.register(self._collector)

    def worker_figures(self) -> list[WorkerFigures]:
        """Every live worker's last published figures, for /metrics (no I/O: discovery's snapshot)."""
        figures = []
        for model, pool in self.pools.items():
            for role in pool.workers.roles():
                for state in pool.workers.states(role):
                    r = state.report
                    if r is not None:
                        figures.append(WorkerFigures(
                            state.worker_id, model, role, r.num_running, r.num_waiting, r.kv_usage,
                            r.prefix_cache_hits, r.prefix_cache_queries, r.kv_transfer_bytes, r.kv_transfer_fallbacks))
        return figures

    async def close(self) -> None:
        if self._collector is not None:
            METRICS_REGISTRY.unregister(self._collector)
            self._collector = None
        await self.discovery.close()
        for model in self._shown:
            self._show(model, 0, 0)
        for pool in self.pools.values():
            await pool.close()
        if self._owns_store and self.store is not None:
            self.store.close()

    def resolve(self, model: str, *, prompt: str | list[int] | None = None,
                messages: list[dict[str, Any]] | None = None, max_tokens: int = 16, priority: int = 0,
                is_gone: IsGone | None = None) -> Route:
        """The serving model and the prompt token ids for a request naming `model` (a served model, an
        alias or `auto`), with either a prompt (text or token ids) or chat messages."""
        counted_with: ModelPool | None = None
        prompt_ids: list[int] | None = None
        if self.models.is_auto(model):
            counted_with = self.pools[self.models.auto.default]
            prompt_ids = _tokenize(counted_with, prompt, messages)
            chosen = self.models.auto_target(_prompt_text(counted_with, prompt, messages), len(prompt_ids),
                                             max_tokens)
        else:
            chosen = self.models.target(model)
        served = self.models.spill(chosen, self._cannot_take)
        if served != chosen:
            SPILLED.labels(model=chosen, to_model=served).inc()
        pool = self.pools[served]
        if prompt_ids is None or pool.tokenizer is not counted_with.tokenizer:
            prompt_ids = _tokenize(pool, prompt, messages)
        if len(prompt_ids) >= pool.max_model_len:
            raise bad_request(f"prompt is {len(prompt_ids)} tokens; the context of {pool.name!r} is "
                              f"{pool.max_model_len}", "messages" if messages is not None else "prompt")
        return Route(self, pool, prompt_ids, model, priority, is_gone)

    def queue_depths(self) -> dict[tuple[str, str], int]:
        """(model, pool) -> requests queued here; each of a model's pools sees its whole queue."""
        return {(model, pool): self.admission[model].num_queued
                for model, pools in self._depth_pools.items() for pool in pools}

    def _cannot_take(self, model: str) -> bool:
        return self.admission[model].is_full or not self.pools[model].is_ready

    def _pump(self) -> None:
        for admission in self.admission.values():  # workers may have joined: caps may have grown
            admission.pump()

    def _admission_changed(self, admission: Admission) -> None:
        self._show(admission.model, admission.num_queued, admission.num_in_flight)

    def _show(self, model: str, num_queued: int, num_in_flight: int) -> None:
        # Gauges move by this router's change: several routers in one process (tests) add up.
        pools = self._depth_pools.setdefault(model, set())
        for pool in self.pools[model].workers.roles() or ["decode"]:
            if pool not in pools:
                pools.add(pool)
                QUEUE_DEPTH.labels(model=model, pool=pool).inc(self._shown.get(model, (0, 0))[0])
        queued, in_flight = self._shown.get(model, (0, 0))
        for pool in pools:
            QUEUE_DEPTH.labels(model=model, pool=pool).inc(num_queued - queued)
        REQUESTS_IN_FLIGHT.labels(model=model).inc(num_in_flight - in_flight)
        self._shown[model] = (num_queued, num_in_flight)


def as_router(pools_or_router: Router | Mapping[str, ModelPool]) -> Router:
    """What the front ends accept: a Router, or a plain {name: ModelPool} (the static case)."""
    if isinstance(pools_or_router, Router):
        return pools_or_router
    return Router.from_pools(pools_or_router)


def _tokenize(pool: ModelPool, prompt: str | list[int] | None, messages: list[dict[str, Any]] | None) -> list[int]:
    if messages is not None:
        return chat_prompt_token_ids(pool, messages)
    if prompt is None:
        raise bad_request("prompt is required", "prompt")
    return prompt_token_ids(pool, prompt)


def _prompt_text(pool: ModelPool, prompt: str | list[int] | None, messages: list[dict[str, Any]] | None) -> str:
    """What `auto` rules' regexes and keywords look at."""
    if messages is not None:
        return "\n".join(m["content"] if isinstance(m["content"], str) else "" for m in messages)
    if isinstance(prompt, str):
        return prompt
    return pool.tokenizer.decode(list(prompt or []))
