"""Dispatch: one request through a model's workers — disaggregated over a prefill and a decode
worker, or on one worker (a unified one, or a decode worker that prefills the prompt itself).

A request here: the pool's policy (policy.py) gets a snapshot of the model's live workers
(discovery.py: their loads, this router's requests on them, and — when the policy weighs prefix hits
or conditional disaggregation needs them — how much of this prompt each has cached, from one Redis
lookup) and picks D among the decode workers (else the unified ones) and P among the prefill workers
→ P is None (the uncached part of the prompt is under `min_prefill_tokens`, or no prefill worker is
live): Decode(expect_kv=false) on D, which prefills and decodes → otherwise Decode(expect_kv) on D (it
reserves KV blocks and answers where the pages must go, or that it will prefill the prompt itself
because its own cache holds more than the index said) → Prefill on P with that destination → the
first token streams to the client at once → the rest arrives on the decode stream. D counts the
request in flight (and the KV blocks it may take) until its stream ends, P while its prefill runs:
that is this router's fresh share of their load between heartbeats. A client that goes away cancels
both calls, which frees the blocks on both workers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

import grpc

from cluster.metrics import REJECTED, ROUTED
from cluster.model.tokenizer import Tokenizer
from cluster.protogen import ensure_generated
from cluster.request import FinishReason, SamplingParams
from cluster.router.discovery import ModelWorkers, WorkerState
from cluster.router.errors import APIError, bad_request, unavailable
from cluster.router.policy import RouteRequest, RoutingPolicy, make_policy
from cluster.worker.convert import (
    TokenLogprob,
    chunk_logprobs,
    finish_from_pb,
    first_token_logprobs,
    params_to_pb,
)

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.FAILED_PRECONDITION: 503,
}

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # tries per request when workers die under it
WORKER_DOWN_S = 5.0  # a worker that dropped a request is skipped this long (discovery drops it for good on TTL)
# UNAVAILABLE: connection refused/reset (the process is gone); UNKNOWN/INTERNAL arrive when a stream is cut.
_WORKER_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)

# (prompt ids, workers) -> {worker id: cached leading tokens}; discovery.Discovery.cached_tokens
CachedTokens = Callable[[Sequence[int], Sequence[WorkerState]], Awaitable[dict[str, int]]]


@dataclass
class ModelPool:
    """The workers serving one model, and what the router needs to talk about its tokens."""

    name: str
    tokenizer: Tokenizer
    max_model_len: int
    # Static worker gRPC addresses: the pool's workers when there is no registry (or until it is read).
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    unified: list[str] = field(default_factory=list)
    min_prefill_tokens: int = 0  # conditional disaggregation: prompts with fewer uncached tokens stay on D
    kv_lease_seconds: float = 30.0

    def __post_init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pb_grpc.WorkerStub] = {}
        self.workers = ModelWorkers(self.prefill, self.decode, self.unified)  # kept fresh by discovery.py
        self.policy: RoutingPolicy = make_policy()  # the Router sets the configured one
        self.cached_tokens: CachedTokens | None = None  # the prefix index, when the router has Redis

    @property
    def is_ready(self) -> bool:
        return self.workers.is_ready

    def _stub(self, address: str) -> pb_grpc.WorkerStub:
        # One stub per worker, kept: building one makes a callable per RPC method (~100 µs, twice a request).
        stub = self._stubs.get(address)
        if stub is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
            stub = self._stubs[address] = pb_grpc.WorkerStub(channel)
        return stub

    async def select(self, prompt_ids: list[int], params: SamplingParams,
                     ) -> tuple[WorkerState | None, WorkerState, str]:
        """(P or None, D, D's role) for this request, by the pool's policy; 503 when no worker can take it."""
        role = "decode" if self.workers.states("decode") else "unified"
        decodes = [s for s in self.workers.states(role) if s.is_up]
        prefills = [s for s in self.workers.states("prefill") if s.is_up] if role == "decode" else []
        if not decodes:
            REJECTED.labels(model=self.name, reason="no_worker").inc()
            raise unavailable(f"no worker serves model {self.name!r}")
        min_prefill = self.min_prefill_tokens if prefills else 0
        cached: dict[str, int] = {}
        if self.cached_tokens is not None and (self.policy.needs_prefix or min_prefill):
            cached = await self.cached_tokens(prompt_ids, [*prefills, *decodes])
        p, d = self.policy.select([s.candidate(cached.get(s.worker_id, 0)) for s in prefills],
                                  [s.candidate(cached.get(s.worker_id, 0)) for s in decodes],
                                  RouteRequest(len(prompt_ids), params.max_tokens, min_prefill))
        by_id = {s.worker_id: s for s in (*prefills, *decodes)}
        return (by_id[p.worker_id] if p is not None else None), by_id[d.worker_id], role

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       ) -> AsyncIterator[tuple[list[int], FinishReason | None, list[TokenLogprob] | None]]:
        """Yield (new token ids, finish reason once finished, their logprobs if params.logprobs) in order.

        A worker that dies mid-request loses nothing: the request goes on on another worker from where
        it stopped (its prompt plus the tokens already streamed, the budget lowered by as many), up to
        `MAX_ATTEMPTS` times; the dead worker is skipped by every request for `WORKER_DOWN_S`."""
        if len(prompt_ids) >= self.max_model_len:
            raise bad_request(f"prompt is {len(prompt_ids)} tokens; the context is {self.max_model_len}", "prompt")
        produced: list[int] = []
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                attempt_items = self._attempt(request_id, prompt_ids + produced, _continuation(params, len(produced)))
                async with contextlib.aclosing(attempt_items):  # closing it now cancels the worker calls
                    async for item in attempt_items:
                        produced.extend(item[0])
                        yield item
                return
            except WorkerLost as lost:
                lost.worker.mark_down(WORKER_DOWN_S)
                if attempt == MAX_ATTEMPTS:
                    raise _api_error(lost.error) from None
                logger.warning("worker %s lost during %s (%s); continuing after %d tokens elsewhere",
                               lost.worker.worker_id, request_id, lost.error.code().name, len(produced))
                request_id = f"{request_id.split('~', 1)[0]}~{attempt}"  # a fresh id: the old one may linger
            except grpc.aio.AioRpcError as exc:
                raise _api_error(exc) from None

    async def _attempt(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        p, d, role = await self.select(prompt_ids, params)
        sampling = params_to_pb(params)
        blocks = -(-(len(prompt_ids) + params.max_tokens) // d.block_size)  # the most D may come to hold
        d.num_in_flight += 1
        d.num_reserved_blocks += blocks
        ROUTED.labels(model=self.name, pool=role, worker=d.worker_id).inc()
        try:
            if p is None:
                call = self._stub(d.address).Decode(pb.DecodeRequest(
                    request_id=request_id, prompt_token_ids=prompt_ids, sampling_params=sampling))
                async with _blame(d):
                    async for chunk in call:
                        yield list(chunk.token_ids), finish_from_pb(chunk.finish_reason), chunk_logprobs(chunk)
            else:
                disaggregated = self._disaggregated(request_id, prompt_ids, sampling, p, d)
                async with contextlib.aclosing(disaggregated):
                    async for item in disaggregated:
                        yield item
        finally:
            d.num_in_flight -= 1
            d.num_reserved_blocks -= blocks

    async def _disaggregated(self, request_id: str, prompt_ids: list[int], sampling: pb.SamplingParams,
                             p: WorkerState, d: WorkerState):
        decode = self._stub(d.address).Decode(pb.DecodeRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, sampling_params=sampling, transfer_id=request_id,
            expect_kv=True, kv_lease_seconds=self.kv_lease_seconds, min_prefill_tokens=self.min_prefill_tokens))
        try:
            async with _blame(d):
                first = await decode.read()
            if first.kv_destination.targets:
                ROUTED.labels(model=self.name, pool="prefill", worker=p.worker_id).inc()
                p.num_in_flight += 1
                try:
                    async with _blame(p):
                        response = await self._stub(p.address).Prefill(pb.PrefillRequest(
                            request_id=request_id, prompt_token_ids=prompt_ids, sampling_params=sampling,
                            transfer_id=request_id, kv_destination=first.kv_destination))
                finally:
                    p.num_in_flight -= 1
                yield [response.first_token_id], None, first_token_logprobs(response)
            while True:
                async with _blame(d):
                    chunk = await decode.read()
                if chunk is grpc.aio.EOF:  # read() started: no iterator now
                    break
                yield list(chunk.token_ids), finish_from_pb(chunk.finish_reason), chunk_logprobs(chunk)
        finally:
            decode.cancel()  # no-op once finished; frees the decode worker's blocks if we stopped early

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


class WorkerLost(Exception):
    """A worker stopped answering mid-request (its process died, or its connection did)."""

    def __init__(self, worker: WorkerState, error: grpc.aio.AioRpcError) -> None:
        super().__init__(f"worker {worker.worker_id} lost: {error.code().name}")
        self.worker = worker
        self.error = error


@contextlib.asynccontextmanager
async def _blame(worker: WorkerState):
    """Turn a lost connection to `worker` into WorkerLost; any other error is the request's own."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        if exc.code() in _WORKER_LOST:
            raise WorkerLost(worker, exc) from exc
        raise


def _continuation(params: SamplingParams, num_produced: int) -> SamplingParams:
    """The rest of a request after `num_produced` tokens were streamed: the same sampling, a smaller budget."""
    if num_produced == 0:
        return params
    return replace(params, max_tokens=params.max_tokens - num_produced,
                   min_tokens=max(params.min_tokens - num_produced, 0))


def _api_error(exc: grpc.aio.AioRpcError) -> APIError:
    status = _STATUS.get(exc.code(), 502)
    detail = exc.details() or exc.code().name
    if status == 400:
        return bad_request(detail, detail.split(" ", 1)[0])
    if status == 429:
        return APIError(429, detail, None, "rate_limit_error", {"Retry-After": "1"})
    return APIError(status, f"worker error: {detail}", None, "service_unavailable", {"Retry-After": "1"})
