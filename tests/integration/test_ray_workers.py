"""Prefill and decode workers as real Ray actors: placed by Ray, serving gRPC, moving KV over gRPC."""

from __future__ import annotations

import random

import grpc
import ray

from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.protogen import ensure_generated
from cluster.request import SamplingParams
from cluster.worker.client import disaggregated_generate

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def test_ray_actor_workers_serve_a_disaggregated_request(ray_cluster, tiny_model_dir):
    from cluster.worker.actor import start_worker_actor

    config = EngineConfig(dtype="float32", num_kv_blocks=128, num_threads=1)
    prefill_actor, prefill_addr = start_worker_actor("prefill", tiny_model_dir, config)
    decode_actor, decode_addr = start_worker_actor("decode", tiny_model_dir, config)
    assert ray.get([prefill_actor.ping.remote(), decode_actor.ping.remote()]) == ["prefill", "decode"]
    rng = random.Random(3)
    prompts = [[rng.randrange(8, 2000) for _ in range(n)] for n in (5, 37)]
    with grpc.insecure_channel(prefill_addr) as p_ch, grpc.insecure_channel(decode_addr) as d_ch:
        prefill, decode = pb_grpc.WorkerStub(p_ch), pb_grpc.WorkerStub(d_ch)
        got = [disaggregated_generate(prefill, decode, f"ray-{i}", p, GREEDY) for i, p in enumerate(prompts)]
        stats = decode.Stats(pb.StatsRequest())
    unified = LLMEngine(str(tiny_model_dir), EngineConfig(dtype="float32", num_kv_blocks=128))
    for i, p in enumerate(prompts):
        unified.add_request(str(i), p, GREEDY)
    want: dict[str, list[int]] = {}
    while unified.has_unfinished_requests():
        for out in unified.step():
            want.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert got == [want[str(i)] for i in range(len(prompts))]
    assert stats.kv_transfer_fallbacks == 0 and stats.num_free_blocks == stats.num_total_blocks
    ray.kill(prefill_actor)
    ray.kill(decode_actor)


def unified_tokens(model_dir, prompts) -> list[list[int]]:
    engine = LLMEngine(str(model_dir), EngineConfig(dtype="float32", num_kv_blocks=128))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    want: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            want.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [want[str(i)] for i in range(len(prompts))]


def test_tp_decode_replica_is_one_actor_per_rank_in_a_strict_pack_group(ray_cluster, tiny_model_dir):
    from ray.util import placement_group_table

    from cluster.worker.actor import start_worker_actor

    tp2 = EngineConfig(dtype="float32", num_kv_blocks=128, num_threads=1, tensor_parallel_size=2)
    decode_actor, decode_addr = start_worker_actor("decode", tiny_model_dir, tp2, num_cpus=0.5)
    prefill_actor, prefill_addr = start_worker_actor(
        "prefill", tiny_model_dir, EngineConfig(dtype="float32", num_kv_blocks=128, num_threads=1), num_cpus=0.5)
    groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
    assert any(g["strategy"] == "STRICT_PACK" and len(g["bundles"]) == 2 for g in groups)
    rng = random.Random(4)
    prompts = [[rng.randrange(8, 2000) for _ in range(n)] for n in (9, 45)]
    with grpc.insecure_channel(prefill_addr) as p_ch, grpc.insecure_channel(decode_addr) as d_ch:
        prefill, decode = pb_grpc.WorkerStub(p_ch), pb_grpc.WorkerStub(d_ch)
        got = [disaggregated_generate(prefill, decode, f"tp-{i}", p, GREEDY) for i, p in enumerate(prompts)]
        stats = decode.Stats(pb.StatsRequest())
    assert got == unified_tokens(tiny_model_dir, prompts)
    assert stats.kv_transfer_fallbacks == 0 and stats.num_free_blocks == stats.num_total_blocks
    ray.get(decode_actor.shutdown.remote())  # STOP reaches the follower actor, which exits
    ray.kill(decode_actor)
    ray.kill(prefill_actor)
