"""Prefill → decode across TP sizes: every rank moves its own KV heads, and the tokens equal a unified engine's.

Two TP=2 replicas (rank 0 of each in this process, rank 1 a spawned process) and TP=1 engines, joined
by the gRPC or the torch.distributed transport (each decode rank, followers included, has its own KV
endpoint):
- prefill TP=1 → decode TP=2: the one prefill rank cuts its heads into a piece per decode rank;
- prefill TP=2 → decode TP=1: each prefill rank sends its piece into the same decode blocks.
Later prompts share a prefix the decode side already holds, so only the missing blocks are sent.
Afterwards no rank holds a block, a sender, a receiver or a registration.
"""

from __future__ import annotations

import random
import time

import pytest

from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.parallel.disagg import add_prefill, reserve_remote_kv
from cluster.parallel.kv_endpoint import KVEndpoint, start_kv_endpoint
from cluster.parallel.launch import TPHandle, launch_tp_engine
from cluster.request import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
CONFIG = dict(dtype="float32", num_kv_blocks=96, max_num_batched_tokens=64, num_threads=1)


def run(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(8, 2000) for _ in range(40)]
    fresh = [[rng.randrange(8, 2000) for _ in range(n)] for n in (1, 17, 70)]
    return fresh + [shared + [rng.randrange(8, 2000) for _ in range(n)] for n in (3, 9, 30)]


def unified(model_dir, prompt_list) -> list[list[int]]:
    engine = LLMEngine(str(model_dir), EngineConfig(**CONFIG))
    for i, p in enumerate(prompt_list):
        engine.add_request(str(i), p, GREEDY)
    got = run(engine)
    return [got[str(i)] for i in range(len(prompt_list))]


def disaggregate(prefill: LLMEngine | None, decode: LLMEngine, endpoint: KVEndpoint, prompt_list, tag: str, *,
                 lease: float = 30.0) -> tuple[list[list[int]], list[int]]:
    """One request at a time, as a router would route them: (tokens, first block sent) per prompt.
    Without a prefill engine nothing is ever sent."""
    prefill_tp = prefill.config.tensor_parallel_size if prefill is not None else 1
    tokens, first_blocks = [], []
    for i, prompt in enumerate(prompt_list):
        rid = f"{tag}-{i}"
        destination = reserve_remote_kv(decode, rid, prompt, GREEDY, endpoint=endpoint, prefill_tp=prefill_tp,
                                        lease_seconds=lease)
        assert destination is not None
        first_blocks.append(destination.first_block_index)
        if prefill is not None:
            add_prefill(prefill, rid, prompt, GREEDY, destination)
            first = run(prefill)[rid]
            assert len(first) == 1  # a prefill replica samples the first token only
        tokens.append(run(decode)[rid])
    return tokens, first_blocks


def assert_idle(engine: LLMEngine, replica: TPHandle | None, timeout_s: float = 10.0) -> None:
    """No leak on any rank; senders finish shipping asynchronously, so give them a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if replica is not None:
                replica.check_no_leaks()
            else:
                engine.kv_manager.check_no_leaks()
                assert not engine.transfers.senders and not engine.transfers.receivers
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def tp2_prefill(tiny_model_dir):
    engine, replica = launch_tp_engine(tiny_model_dir, EngineConfig(tensor_parallel_size=2, **CONFIG))
    yield engine, replica
    replica.shutdown()


@pytest.fixture(scope="module", params=["grpc", "dist"])
def transport(request) -> str:
    """The KV transport between prefill and decode ranks (both work across processes)."""
    return request.param


@pytest.fixture(scope="module")
def tp2_decode(tiny_model_dir, transport):
    engine, replica = launch_tp_engine(tiny_model_dir, EngineConfig(tensor_parallel_size=2, **CONFIG),
                                       kv_transport=transport)
    endpoint = start_kv_endpoint(transport)  # rank 0's, in this process
    endpoint.peer_addresses = tuple(replica.kv_addresses)
    yield engine, replica, endpoint
    replica.shutdown()
    endpoint.close()


@pytest.fixture(scope="module")
def tp1_decode(tiny_model_dir, transport):
    endpoint = start_kv_endpoint(transport)
    yield LLMEngine(str(tiny_model_dir), EngineConfig(**CONFIG)), endpoint
    endpoint.close()


def test_prefill_tp1_to_decode_tp2(tp2_decode, tiny_model_dir):
    decode, replica, endpoint = tp2_decode
    prefill = LLMEngine(str(tiny_model_dir), EngineConfig(**CONFIG))
    prompt_list = prompts(seed=5)
    got, first_blocks = disaggregate(prefill, decode, endpoint, prompt_list, "p1d2")
    assert got == unified(tiny_model_dir, prompt_list)
    assert first_blocks[-2:] == [2, 2]  # the shared 40-token prefix: two full blocks not sent again
    assert decode.num_kv_transfer_fallbacks == 0
    assert_idle(decode, replica)
    assert_idle(prefill, None)


def test_prefill_tp2_to_decode_tp1(tp2_prefill, tp1_decode, tiny_model_dir):
    prefill, replica = tp2_prefill
    decode, endpoint = tp1_decode
    prompt_list = prompts(seed=6)
    got, first_blocks = disaggregate(prefill, decode, endpoint, prompt_list, "p2d1")
    assert got == unified(tiny_model_dir, prompt_list)
    assert first_blocks[-2:] == [2, 2]
    assert decode.num_kv_transfer_fallbacks == 0
    assert_idle(decode, None)
    assert_idle(prefill, replica)


def test_lost_sender_and_abort_on_a_tp_decode(tp2_decode, tiny_model_dir):
    """Nothing is sent: every rank's receivers fail by the lease and the prompt is prefilled on the
    replica itself; a request aborted while waiting for KV leaves no receiver behind on any rank."""
    decode, replica, endpoint = tp2_decode
    prompt_list = prompts(seed=7)[1:3]
    before = decode.num_kv_transfer_fallbacks
    got, _ = disaggregate(None, decode, endpoint, prompt_list, "lost", lease=0.3)
    assert got == unified(tiny_model_dir, prompt_list)
    assert decode.num_kv_transfer_fallbacks == before + 2
    assert reserve_remote_kv(decode, "gone", prompt_list[0], GREEDY, endpoint=endpoint) is not None
    assert replica.follower_stats()[0]["receivers"] == 1
    decode.abort("gone")
    assert_idle(decode, replica)
