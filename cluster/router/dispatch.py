"""Dispatch: one request through a model's pools — disaggregated when the model has prefill and
decode workers, colocated on a unified worker otherwise.

A disaggregated request here: Decode(expect_kv) on the next decode worker (it reserves KV blocks and
answers where the pages must go, or that it will prefill the prompt itself because little of it is
missing from its prefix cache) → Prefill on the next prefill worker with that destination → the
first token streams to the client at once → the rest arrives on the decode stream. A client that
goes away cancels both calls, which frees the blocks on both workers.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from cluster.model.tokenizer import Tokenizer
from cluster.protogen import ensure_generated
from cluster.request import FinishReason, SamplingParams
from cluster.router.errors import APIError, bad_request, unavailable
from cluster.worker.convert import finish_from_pb, params_to_pb

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.FAILED_PRECONDITION: 503,
}


@dataclass
class ModelPool:
    """The workers serving one model, and what the router needs to talk about its tokens."""

    name: str
    tokenizer: Tokenizer
    max_model_len: int
    prefill: list[str] = field(default_factory=list)  # worker gRPC addresses
    decode: list[str] = field(default_factory=list)
    unified: list[str] = field(default_factory=list)
    min_prefill_tokens: int = 0  # conditional disaggregation threshold, decided by the decode worker
    kv_lease_seconds: float = 30.0

    def __post_init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._next = {role: itertools.cycle(range(1 << 30)) for role in ("prefill", "decode", "unified")}

    @property
    def is_ready(self) -> bool:
        return bool(self.prefill and self.decode) or bool(self.unified)

    def _pick(self, role: str) -> pb_grpc.WorkerStub:
        addresses = getattr(self, role)
        address = addresses[next(self._next[role]) % len(addresses)]
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return pb_grpc.WorkerStub(channel)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       ) -> AsyncIterator[tuple[list[int], FinishReason | None]]:
        """Yield (new token ids, finish reason once finished) in order."""
        if len(prompt_ids) >= self.max_model_len:
            raise bad_request(f"prompt is {len(prompt_ids)} tokens; the context is {self.max_model_len}", "prompt")
        sampling = params_to_pb(params)
        try:
            if self.prefill and self.decode:
                async for item in self._disaggregated(request_id, prompt_ids, sampling):
                    yield item
            elif self.unified:
                call = self._pick("unified").Decode(pb.DecodeRequest(
                    request_id=request_id, prompt_token_ids=prompt_ids, sampling_params=sampling))
                async for chunk in call:
                    yield list(chunk.token_ids), finish_from_pb(chunk.finish_reason)
            else:
                raise unavailable(f"no worker serves model {self.name!r}")
        except grpc.aio.AioRpcError as exc:
            raise _api_error(exc) from None

    async def _disaggregated(self, request_id, prompt_ids, sampling):
        decode = self._pick("decode").Decode(pb.DecodeRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, sampling_params=sampling, transfer_id=request_id,
            expect_kv=True, kv_lease_seconds=self.kv_lease_seconds, min_prefill_tokens=self.min_prefill_tokens))
        try:
            first = await decode.read()
            if first.kv_destination.targets:
                response = await self._pick("prefill").Prefill(pb.PrefillRequest(
                    request_id=request_id, prompt_token_ids=prompt_ids, sampling_params=sampling,
                    transfer_id=request_id, kv_destination=first.kv_destination))
                yield [response.first_token_id], None
            while (chunk := await decode.read()) is not grpc.aio.EOF:  # read() started: no iterator now
                yield list(chunk.token_ids), finish_from_pb(chunk.finish_reason)
        finally:
            decode.cancel()  # no-op once finished; frees the decode worker's blocks if we stopped early

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def _api_error(exc: grpc.aio.AioRpcError) -> APIError:
    status = _STATUS.get(exc.code(), 502)
    detail = exc.details() or exc.code().name
    if status == 400:
        return bad_request(detail, detail.split(" ", 1)[0])
    if status == 429:
        return APIError(429, detail, None, "rate_limit_error", {"Retry-After": "1"})
    return APIError(status, f"worker error: {detail}", None, "service_unavailable", {"Retry-After": "1"})
