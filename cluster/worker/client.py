"""A worker client that runs one request the disaggregated way: the router's core loop, minus routing.

1. Decode(expect_kv) on the decode worker: it reserves blocks and answers where the KV must go.
2. Prefill on the prefill worker with that destination: the KV moves, the first token comes back.
3. The rest of the tokens arrive on the decode stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from cluster.protogen import ensure_generated
from cluster.request import SamplingParams
from cluster.worker.convert import finish_from_pb, params_to_pb

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402


@dataclass
class TokenEvent:
    token_ids: list[int]
    finish_reason: object | None  # FinishReason once finished
    is_kv_fallback: bool = False


def disaggregated_stream(prefill_stub, decode_stub, request_id: str, prompt_token_ids: list[int],
                         params: SamplingParams, lease_seconds: float = 30.0, min_prefill_tokens: int = 0,
                         timeout: float = 120.0) -> Iterator[TokenEvent]:
    """Yield token events in order: the prefill's first token, then the decode stream's.

    With `min_prefill_tokens` the decode worker may keep a short (or mostly cached) prompt for itself;
    its first chunk then names no KV targets and the prefill worker is not called."""
    sampling = params_to_pb(params)
    stream = decode_stub.Decode(pb.DecodeRequest(
        request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=sampling,
        transfer_id=request_id, expect_kv=True, kv_lease_seconds=lease_seconds,
        min_prefill_tokens=min_prefill_tokens), timeout=timeout)
    try:
        first = next(stream)
        if first.kv_destination.targets:
            response = prefill_stub.Prefill(pb.PrefillRequest(
                request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=sampling,
                transfer_id=request_id, kv_destination=first.kv_destination), timeout=timeout)
            yield TokenEvent([response.first_token_id], None)
        for chunk in stream:
            yield TokenEvent(list(chunk.token_ids), finish_from_pb(chunk.finish_reason), chunk.kv_fallback)
    finally:
        stream.cancel()  # no-op once finished; frees the decode worker's blocks if we stop early


def disaggregated_generate(prefill_stub, decode_stub, request_id: str, prompt_token_ids: list[int],
                           params: SamplingParams, **kwargs) -> list[int]:
    return [t for event in disaggregated_stream(prefill_stub, decode_stub, request_id, prompt_token_ids,
                                                params, **kwargs) for t in event.token_ids]
