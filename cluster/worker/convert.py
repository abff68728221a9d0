"""Protobuf <-> engine types for the worker API (no pickle crosses the network: only these messages)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.protogen import ensure_generated
from cluster.request import FinishReason, SamplingParams

if TYPE_CHECKING:  # cluster.parallel imports torch; the simulated worker uses this module without it
    from cluster.engine.sampler import TokenLogprobs
    from cluster.parallel.destination import KVDestination

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402

_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
_FINISH_BACK = {v: k for k, v in _FINISH.items()}


def params_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Raises ValueError naming the field, like the Python API."""
    return SamplingParams(
        n=msg.n or 1,
        temperature=msg.temperature,
        top_p=msg.top_p if msg.top_p else 1.0,
        top_k=msg.top_k,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty or 1.0,
        max_tokens=msg.max_tokens or 16,
        min_tokens=msg.min_tokens,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
    )


def params_to_pb(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, max_tokens=params.max_tokens, min_tokens=params.min_tokens,
        stop=params.stop, stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def finish_to_pb(reason: FinishReason | None) -> int:
    return _FINISH[reason]


def finish_from_pb(value: int) -> FinishReason | None:
    return _FINISH_BACK[value]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's raw logprob and the top-N alternatives (token_id, logprob), best first,
    as the router receives them (the engine's TokenLogprobs without the rank, which is not sent)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def top_logprobs_to_pb(lp: TokenLogprobs) -> pb.TopLogprobs:
    return pb.TopLogprobs(token_ids=[t for t, _ in lp.top], logprobs=[v for _, v in lp.top])


def fill_logprobs(chunk: pb.TokenChunk, logprobs: Sequence[TokenLogprobs] | None) -> pb.TokenChunk:
    """Set the chunk's logprobs (one per token id) from the engine's; no-op when none were asked for."""
    if logprobs:
        chunk.logprobs.extend(lp.logprob for lp in logprobs)
        chunk.top_logprobs.extend(top_logprobs_to_pb(lp) for lp in logprobs)
    return chunk


def chunk_logprobs(chunk: pb.TokenChunk) -> list[TokenLogprob] | None:
    """A Decode chunk's logprobs, one per token id; None when the chunk carries none."""
    if not chunk.logprobs or len(chunk.logprobs) != len(chunk.token_ids):
        return None
    tops = chunk.top_logprobs
    return [TokenLogprob(t, lp, _top(tops[i]) if i < len(tops) else ())
            for i, (t, lp) in enumerate(zip(chunk.token_ids, chunk.logprobs, strict=True))]


def first_token_logprobs(response: pb.PrefillResponse) -> list[TokenLogprob] | None:
    """The prefill worker's first token's logprobs, or None when none were asked for."""
    if not response.HasField("first_token_logprob"):
        return None
    return [TokenLogprob(response.first_token_id, response.first_token_logprob,
                         _top(response.first_token_top_logprobs))]


def _top(msg: pb.TopLogprobs) -> tuple[tuple[int, float], ...]:
    return tuple(zip(msg.token_ids, msg.logprobs, strict=True))


def destination_to_pb(destination: KVDestination) -> pb.KVDestination:
    return pb.KVDestination(
        transport=destination.transport, first_block_index=destination.first_block_index,
        num_blocks=destination.num_blocks, lease_seconds=destination.lease_seconds,
        targets=[pb.KVTarget(decode_rank=t.decode_rank, address=t.address, transfer_id=t.transfer_id,
                             kv_head_start=t.kv_head_start, kv_head_end=t.kv_head_end) for t in destination.targets],
    )


def destination_from_pb(msg: pb.KVDestination) -> KVDestination:
    from cluster.parallel.destination import KVDestination, KVTarget

    return KVDestination(
        transport=msg.transport, first_block_index=msg.first_block_index, num_blocks=msg.num_blocks,
        lease_seconds=msg.lease_seconds,
        targets=tuple(KVTarget(t.decode_rank, t.address, t.transfer_id, t.kv_head_start, t.kv_head_end)
                      for t in msg.targets),
    )
