"""Acceptance 2 of the autoscaler: a decode pool scaled down while its workers stream; every stream finishes
intact. Real Ray actors (simulated workers with a capacity, cluster/autoscale/sim_worker.py), a real
embedded Redis, the real router in this process; the Ray actuator drains the removed replica first."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
import ray

from cluster.autoscale.ray_actuator import RayActuator
from cluster.autoscale.replicas import simulated_factory
from cluster.model.tokenizer import Tokenizer
from cluster.protogen import ensure_generated
from cluster.request import SamplingParams
from cluster.router.core import Router
from cluster.router.dispatch import ModelPool
from cluster.router.textgen import text_events
from cluster.state import StateStore, start_embedded_redis
from cluster.worker.simulated import simulated_tokens

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

MODEL, VOCAB, MAX_TOKENS = "drainsim", 2048, 40
SIM = {"ttft_s": 0.02, "itl_s": 0.05, "vocab_size": VOCAB}  # a stream lasts about 2 s


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    server = start_embedded_redis(tmp_path / "redis")
    yield server.url
    server.close()


async def wait_for(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def streams_on(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stats = await pb_grpc.WorkerStub(channel).Stats(pb.StatsRequest(), timeout=10)
    return stats.num_requests_running + stats.num_requests_waiting


async def tokens_of(router: Router, request_id: str, prompt: list[int]) -> tuple[list[int], str | None]:
    route = router.resolve(MODEL, prompt=prompt, max_tokens=MAX_TOKENS)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    tokens, finish = [], None
    async for _, ids, reason, _ in text_events(route, request_id, route.prompt_ids, params):
        tokens += ids
        finish = reason or finish
    return tokens, finish


def test_scaling_a_decode_pool_down_while_it_streams_loses_nothing(ray_cluster, redis_url, tiny_model_dir):
    store = StateStore.from_url(redis_url)
    factory = simulated_factory(MODEL, "decode", SIM, capacity=16, redis_url=redis_url, registry_ttl_s=6.0)
    actuator = RayActuator({(MODEL, "decode"): factory}, store=store, poll_s=0.1)

    async def body() -> None:
        actuator.scale(MODEL, "decode", 2)
        await wait_for(lambda: asyncio.to_thread(lambda: len(store.list_workers(MODEL, "decode")) == 2),
                       "two decode replicas")
        pool = ModelPool(MODEL, Tokenizer.from_dir(tiny_model_dir), 2048)
        router = Router.from_config({MODEL: pool}, {"poll_interval_s": 0.1}, redis_url=redis_url)
        await router.start()
        try:
            addresses = pool.workers.addresses("decode")
            assert len(addresses) == 2
            prompts = {f"s{i}": [1 + i, 2 + i, 3 + i, 4 + i] for i in range(8)}
            streams = {rid: asyncio.create_task(tokens_of(router, rid, p)) for rid, p in prompts.items()}

            async def both_streaming() -> bool:
                counts = await asyncio.gather(*(streams_on(a) for a in addresses))
                return all(counts) and sum(counts) == len(streams)

            await wait_for(both_streaming, "streams on both replicas")
            actuator.scale(MODEL, "decode", 1)  # whichever goes, it holds streams now
            assert actuator.num_replicas(MODEL, "decode") == 1
            # Requests sent during the drain go elsewhere (or are retried there) and complete too.
            late = [asyncio.create_task(tokens_of(router, f"late{i}", [9, 9, i])) for i in range(4)]

            for rid, task in streams.items():
                tokens, finish = await task
                assert finish == "length" and tokens == simulated_tokens(rid, prompts[rid], MAX_TOKENS, VOCAB), rid
            for task in late:
                tokens, finish = await task
                assert finish == "length" and len(tokens) == MAX_TOKENS

            def drained() -> bool:
                return [e for *_, e in actuator.history].count("stopped") == 1
            await wait_for(lambda: asyncio.to_thread(drained), "the drained replica to stop")
        finally:
            await router.close()
        (kept,) = actuator.replicas(MODEL, "decode")
        assert [w.worker_id for w in store.list_workers(MODEL, "decode")] == [kept.started.worker_id]
        events = [(name, e) for *_, name, e in actuator.history]
        (gone,) = {name for name, e in events if e == "draining"}
        life = [e for name, e in events if name == gone]
        assert life[-3] == "draining" and life[-1] == "stopped" and gone != kept.name
        assert int(life[-2].removeprefix("drain started with ").split()[0]) > 0  # it held streams then
        deadline = time.monotonic() + 30
        while gone in ray.util.list_named_actors():  # killed: Ray forgets its name
            assert time.monotonic() < deadline, "the drained actor is still alive"
            time.sleep(0.1)

    try:
        asyncio.run(body())
    finally:
        actuator.close()
        store.close()


def test_a_replica_whose_actor_died_is_replaced(ray_cluster, redis_url):
    store = StateStore.from_url(redis_url)
    factory = simulated_factory(MODEL, "decode", SIM, capacity=4, redis_url=redis_url, registry_ttl_s=6.0)
    actuator = RayActuator({(MODEL, "decode"): factory}, store=store)
    try:
        actuator.scale(MODEL, "decode", 1)
        deadline = time.monotonic() + 60
        while not [r for r in actuator.replicas(MODEL, "decode") if r.state == "serving"]:
            assert time.monotonic() < deadline, "no replica came up"
            time.sleep(0.05)
        (first,) = actuator.replicas(MODEL, "decode")
        actuator.scale(MODEL, "decode", 1)  # its first ping goes out
        ray.kill(first.started.actor)
        while first in actuator.replicas(MODEL, "decode"):  # the controller calls scale at every decision
            assert time.monotonic() < deadline, "the dead replica was never noticed"
            actuator.scale(MODEL, "decode", 1)
            time.sleep(0.05)
        (second,) = actuator.replicas(MODEL, "decode")
        assert second.name != first.name and actuator.num_replicas(MODEL, "decode") == 1
        while second.state != "serving":
            assert time.monotonic() < deadline, "the replacement never served"
            time.sleep(0.05)
        assert any(name == first.name and event.startswith("died") for *_, name, event in actuator.history)
    finally:
        actuator.close()
        store.close()


def test_a_real_engine_replica_is_started_from_the_cluster_config_and_drained(ray_cluster, redis_url, tiny_model_dir):
    from cluster.autoscale.replicas import cluster_factories
    from cluster.config import ClusterConfig, EngineConfig, ModelDeployment

    config = ClusterConfig(models=[ModelDeployment(path=str(tiny_model_dir), name="tiny-as", worker_num_cpus=0.5)],
                           engine=EngineConfig(dtype="float32", num_kv_blocks=64, num_threads=1, block_size=8),
                           heartbeat_ttl_s=6.0)
    store = StateStore.from_url(redis_url)
    actuator = RayActuator(cluster_factories(config, redis_url), store=store, poll_s=0.1)

    async def body() -> None:
        actuator.scale("tiny-as", "decode", 1)
        await wait_for(lambda: asyncio.to_thread(lambda: len(store.list_workers("tiny-as", "decode")) == 1),
                       "the engine replica", timeout_s=120)
        pool = ModelPool("tiny-as", Tokenizer.from_dir(tiny_model_dir), 512)
        router = Router.from_config({"tiny-as": pool}, {"poll_interval_s": 0.1}, redis_url=redis_url)
        await router.start()
        try:
            route = router.resolve("tiny-as", prompt="The autoscaler drains", max_tokens=200)
            params = SamplingParams(max_tokens=200, ignore_eos=True)
            events = text_events(route, "eng-0", route.prompt_ids, params)
            tokens = list((await anext(events))[1])
            actuator.scale("tiny-as", "decode", 0)  # mid-stream
            finish = None
            async for _, ids, reason, _ in events:
                tokens += ids
                finish = reason or finish
            assert finish == "length" and len(tokens) == 200
        finally:
            await router.close()
        await wait_for(lambda: asyncio.to_thread(lambda: "stopped" in [e for *_, e in actuator.history]),
                       "the engine replica to stop")
        assert store.list_workers("tiny-as") == [] and actuator.replicas("tiny-as", "decode") == []
        assert "drain started with 1 in flight" in [e for *_, e in actuator.history]  # it drained mid-stream

    try:
        asyncio.run(body())
    finally:
        actuator.close()
        store.close()
