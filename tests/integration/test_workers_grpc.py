"""Prefill and decode workers as real processes: requests over gRPC, KV pages over gRPC or
torch.distributed (gloo pair groups).

The test plays the router: Decode(expect_kv) on the decode worker → it answers where the KV must go →
Prefill on the prefill worker with that destination → first token back; the decode stream carries the
rest. The greedy tokens must equal a unified in-process engine's on the same checkpoint.
"""

from __future__ import annotations

import random
import subprocess

import grpc
import pytest

from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.model.arch import ModelArchConfig
from cluster.protogen import ensure_generated
from cluster.request import SamplingParams
from cluster.worker.convert import params_to_pb
from loadtest.workers import start_cli_worker

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def start_worker(model_dir, role: str, transport: str) -> tuple[subprocess.Popen, str]:
    w = start_cli_worker(["--role", role, "--model", str(model_dir), "--num-kv-blocks", "256", "--threads", "1",
                          "--kv-transport", transport, "--dtype", "float32"], timeout=60)
    return w.proc, w.address


@pytest.fixture(scope="module", params=["grpc", "dist"])
def workers(tiny_model_dir, request):
    """A prefill and a decode worker process; KV moves by the parametrized transport."""
    procs = []
    try:
        prefill_proc, prefill_addr = start_worker(tiny_model_dir, "prefill", request.param)
        procs.append(prefill_proc)
        decode_proc, decode_addr = start_worker(tiny_model_dir, "decode", request.param)
        procs.append(decode_proc)
        channels = [grpc.insecure_channel(prefill_addr), grpc.insecure_channel(decode_addr)]
        yield pb_grpc.WorkerStub(channels[0]), pb_grpc.WorkerStub(channels[1]), prefill_proc
        for ch in channels:
            ch.close()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def route(prefill, decode, rid: str, prompt: list[int], params=GREEDY, lease=30.0, skip_prefill=False):
    """What the router does for one disaggregated request; returns (tokens, saw_fallback)."""
    stream = decode.Decode(pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=params_to_pb(params),
                                            transfer_id=rid, expect_kv=True, kv_lease_seconds=lease), timeout=60)
    first = next(stream)
    assert first.HasField("kv_destination") and first.kv_destination.targets
    tokens, fallback = [], False
    if not skip_prefill:
        response = prefill.Prefill(pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt,
                                                     sampling_params=params_to_pb(params), transfer_id=rid,
                                                     kv_destination=first.kv_destination), timeout=60)
        tokens.append(response.first_token_id)
    for chunk in stream:
        fallback |= chunk.kv_fallback
        tokens.extend(chunk.token_ids)
    return tokens, fallback, first.kv_destination.first_block_index


def unified(model_dir, prompts) -> list[list[int]]:
    engine = LLMEngine(str(model_dir), EngineConfig(dtype="float32", num_kv_blocks=256))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [got[str(i)] for i in range(len(prompts))]


def test_disaggregated_over_grpc_equals_unified(workers, tiny_model_dir):
    prefill, decode, _ = workers
    rng = random.Random(21)
    shared = [rng.randrange(8, 2000) for _ in range(40)]
    prompts = [[rng.randrange(8, 2000) for _ in range(n)] for n in (1, 17, 90)]
    prompts += [shared + [rng.randrange(8, 2000) for _ in range(n)] for n in (3, 9)]  # 2nd hits D's cache
    results = [route(prefill, decode, f"g{i}", p) for i, p in enumerate(prompts)]
    assert [tokens for tokens, _, _ in results] == unified(tiny_model_dir, prompts)
    assert not any(fallback for _, fallback, _ in results)
    assert results[-1][2] == 2  # two full blocks of the shared prefix were not sent again
    stats = decode.Stats(pb.StatsRequest())
    assert stats.kv_transfer_fallbacks == 0
    # The blocks that crossed (every prompt's, less the 2 the decode worker held), K and V, fp32.
    arch = ModelArchConfig.from_dir(tiny_model_dir)
    block_bytes = 2 * arch.num_layers * 16 * arch.num_kv_heads * arch.head_dim * 4
    assert stats.kv_transfer_bytes == block_bytes * (sum(-(-len(p) // 16) for p in prompts) - 2)
    assert stats.num_free_blocks == stats.num_total_blocks  # nothing leaked on the decode worker
    p_stats = prefill.Stats(pb.StatsRequest())
    assert p_stats.num_free_blocks == p_stats.num_total_blocks


def test_prefill_that_never_comes_falls_back_after_the_lease(workers, tiny_model_dir):
    _, decode, _ = workers
    prompt = list(range(100, 160))
    tokens, fallback, _ = route(None, decode, "lost", prompt, lease=0.3, skip_prefill=True)
    assert fallback
    assert tokens == unified(tiny_model_dir, [prompt])[0]
    assert decode.Stats(pb.StatsRequest()).kv_transfer_fallbacks >= 1


def test_bad_input_and_wrong_role(workers):
    prefill, decode, _ = workers
    bad = pb.SamplingParams(temperature=-1.0, max_tokens=4)
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Decode(pb.DecodeRequest(request_id="bad", prompt_token_ids=[1, 2], sampling_params=bad)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(prefill.Decode(pb.DecodeRequest(request_id="x", prompt_token_ids=[1, 2])))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert decode.Health(pb.HealthRequest()).status == pb.HealthResponse.SERVING


def test_conditional_disaggregation_keeps_short_prompts_on_the_decode_worker(workers, tiny_model_dir):
    from cluster.worker.client import disaggregated_generate

    prefill, decode, _ = workers
    short, long_ = list(range(300, 310)), list(range(400, 480))
    before = prefill.Stats(pb.StatsRequest()).prefix_cache_queries
    got_short = disaggregated_generate(prefill, decode, "cd-short", short, GREEDY, min_prefill_tokens=32)
    assert prefill.Stats(pb.StatsRequest()).prefix_cache_queries == before  # the prefill worker never saw it
    got_long = disaggregated_generate(prefill, decode, "cd-long", long_, GREEDY, min_prefill_tokens=32)
    assert prefill.Stats(pb.StatsRequest()).prefix_cache_queries > before
    # long_'s first 64 tokens are now cached on the decode worker: only 16 remain, so it stays local
    again = long_[:64] + list(range(900, 910))
    before = prefill.Stats(pb.StatsRequest()).prefix_cache_queries
    got_again = disaggregated_generate(prefill, decode, "cd-again", again, GREEDY, min_prefill_tokens=32)
    assert prefill.Stats(pb.StatsRequest()).prefix_cache_queries == before
    assert [got_short, got_long, got_again] == unified(tiny_model_dir, [short, long_, again])
