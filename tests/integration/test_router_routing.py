"""The router's dispatch against a real embedded Redis and real simulated worker processes
(`pdserve worker --role simulated`), two per role, registered in Redis as model "sim": discovery finds
them, least_loaded spreads streams by published load plus the router's own, a deregistered worker
leaves the rotation, queue depths reach Redis, and prefix_aware / conditional disaggregation follow
the Redis prefix index. Which worker holds a stream is read from the workers themselves (Stats)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

from cluster.kv.hashing import prompt_block_hashes
from cluster.metrics import REGISTRY
from cluster.model.tokenizer import Tokenizer
from cluster.protogen import ensure_generated
from cluster.request import SamplingParams
from cluster.router.core import Router
from cluster.router.dispatch import ModelPool
from cluster.router.textgen import text_events
from cluster.state import LoadReport, StateStore, WorkerInfo, start_embedded_redis
from cluster.worker.simulated import simulated_tokens
from loadtest.workers import start_cli_worker

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

VOCAB = 2048
MODEL = "sim"
HOLD = SamplingParams(max_tokens=100_000, ignore_eos=True)  # a stream that lasts until closed


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    server = start_embedded_redis(tmp_path_factory.mktemp("router-redis"))
    yield server.url
    server.close()


@pytest.fixture(scope="module")
def addresses() -> Iterator[dict[str, str]]:
    """worker id -> address: two simulated processes per role."""
    procs = []
    try:
        for _ in range(4):
            procs.append(start_cli_worker(["--role", "simulated", "--vocab-size", str(VOCAB), "--ttft-ms", "20",
                                           "--itl-ms", "20"], timeout=60))
        ids = ["sim-prefill-0", "sim-prefill-1", "sim-decode-0", "sim-decode-1"]
        yield dict(zip(ids, (p.address for p in procs), strict=True))
    finally:
        for p in procs:
            p.stop()


@pytest.fixture
def store(redis_url, addresses) -> Iterator[StateStore]:
    s = StateStore.from_url(redis_url)
    s.r.flushdb()
    for worker_id, address in addresses.items():
        s.register(WorkerInfo(worker_id, MODEL, worker_id.split("-")[1], address), ttl_s=60)
    yield s
    s.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


def load(num_running: int = 0, max_num_seqs: int = 0) -> LoadReport:
    return LoadReport(num_running=num_running, num_waiting=0, num_waiting_for_kv=0, num_free_blocks=100,
                      num_total_blocks=100, kv_usage=0.0, max_num_seqs=max_num_seqs)


def routed(pool: str, worker_id: str) -> float:
    labels = {"model": MODEL, "pool": pool, "worker": worker_id}
    return REGISTRY.get_sample_value("pdserve:requests_routed_total", labels) or 0.0


async def streams_on(address: str) -> int:
    """Decode streams the worker holds now (waiting for their KV, or emitting tokens)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stats = await pb_grpc.WorkerStub(channel).Stats(pb.StatsRequest())
    return stats.num_requests_running + stats.num_requests_waiting_for_kv


async def wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def open_stream(router: Router, request_id: str, prompt: list[int]):
    """Start a stream and wait for its first token; the caller closes it."""
    route = router.resolve(MODEL, prompt=prompt, max_tokens=HOLD.max_tokens)
    events = text_events(route, request_id, route.prompt_ids, HOLD)
    await anext(events)
    return events


async def tokens_of(router: Router, request_id: str, prompt: list[int], max_tokens: int) -> list[int]:
    route = router.resolve(MODEL, prompt=prompt, max_tokens=max_tokens)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [t async for event in text_events(route, request_id, route.prompt_ids, params) for t in event[1]]


def make_router(tokenizer, redis_url, config: dict | None = None, **pool_kw) -> Router:
    pool = ModelPool(MODEL, tokenizer, 2048, **pool_kw)  # no static addresses: Redis says who serves
    return Router.from_config({MODEL: pool}, {"poll_interval_s": 0.1, **(config or {})}, redis_url=redis_url)


def test_discovery_finds_the_registered_workers_and_routes_through_them(store, addresses, tokenizer, redis_url):
    async def body() -> None:
        router = make_router(tokenizer, redis_url)
        pool = router.pools[MODEL]
        assert not pool.is_ready
        await router.start()
        try:
            assert pool.workers.addresses("prefill") == [addresses["sim-prefill-0"], addresses["sim-prefill-1"]]
            assert pool.workers.addresses("decode") == [addresses["sim-decode-0"], addresses["sim-decode-1"]]
            before = sum(routed("prefill", w) for w in addresses)
            prompt = list(range(1, 30))
            assert await tokens_of(router, "r0", prompt, 6) == simulated_tokens("r0", prompt, 6, VOCAB)
            assert sum(routed("prefill", w) for w in addresses) == before + 1  # prefill on P, the rest on D
        finally:
            await router.close()

    asyncio.run(body())


def test_least_loaded_spreads_by_published_and_own_load_and_a_worker_leaves_rotation(
        store, addresses, tokenizer, redis_url):
    d0, d1 = addresses["sim-decode-0"], addresses["sim-decode-1"]
    store.publish_load("sim-decode-0", load(num_running=4), ttl_s=60)  # busy with another router's work
    store.publish_load("sim-decode-1", load(), ttl_s=60)

    async def body() -> None:
        router = make_router(tokenizer, redis_url, {"decode_policy": "least_loaded"})
        await router.start()
        try:
            held = [await open_stream(router, f"hold{i}", [i + 1] * 8) for i in range(8)]
            # decode-1 takes the first 4 (its load catches up with decode-0's 4), then they alternate.
            assert (await streams_on(d0), await streams_on(d1)) == (2, 6)
            for events in held:
                await events.aclose()  # cancels the worker calls
            await wait_for(lambda: _idle(d0, d1))
            assert router.admission[MODEL].num_in_flight == 0

            store.deregister("sim-decode-0")

            async def gone() -> bool:
                return router.pools[MODEL].workers.addresses("decode") == [d1]

            await wait_for(gone)
            held = [await open_stream(router, f"after{i}", [i + 1] * 8) for i in range(4)]
            assert (await streams_on(d0), await streams_on(d1)) == (0, 4)
            for events in held:
                await events.aclose()
        finally:
            await router.close()

    asyncio.run(body())


async def _idle(*workers: str) -> bool:
    return all([await streams_on(w) == 0 for w in workers])


def test_admission_caps_at_the_workers_max_num_seqs_and_publishes_the_queue_depth(
        store, addresses, tokenizer, redis_url):
    for worker_id in ("sim-decode-0", "sim-decode-1"):
        store.publish_load(worker_id, load(max_num_seqs=1), ttl_s=60)  # 2 sequences in flight at most

    def gauge(pool: str) -> float:
        return REGISTRY.get_sample_value("pdserve:queue_depth", {"model": MODEL, "pool": pool}) or 0.0

    async def body() -> None:
        router = make_router(tokenizer, redis_url, {"admission": {"max_queue": 4}})
        await router.start()
        admission = router.admission[MODEL]
        try:
            assert admission.max_in_flight == 2
            held = [await open_stream(router, f"cap{i}", [7, i]) for i in range(2)]
            queued = [asyncio.create_task(open_stream(router, f"queued{i}", [8, i])) for i in range(2)]

            async def published(depth: int) -> bool:
                return (admission.num_queued == depth and store.queue_depth(MODEL, "decode") == depth
                        and store.queue_depth(MODEL, "prefill") == depth)

            await wait_for(lambda: published(2))
            assert gauge("decode") >= 2  # other routers in this process may add theirs
            queued[1].cancel()  # its client went away
            await wait_for(lambda: published(1))
            await held[0].aclose()  # a slot frees: the queued request runs
            held[0] = await queued[0]
            assert admission.num_in_flight == 2 and admission.num_queued == 0
            for events in held:
                await events.aclose()
            await wait_for(lambda: published(0))
        finally:
            await router.close()

    asyncio.run(body())


def test_prefix_aware_and_conditional_disaggregation_follow_the_prefix_index(store, addresses, tokenizer, redis_url):
    async def body() -> None:
        router = make_router(tokenizer, redis_url, {"prefill_policy": "prefix_aware", "decode_policy": "prefix_aware"},
                             min_prefill_tokens=32)
        await router.start()
        try:
            # prefill-1 has this 64-token prompt cached (4 blocks of 16): each request prefills there.
            shared = [(i * 7) % 1000 + 1 for i in range(64)]
            assert store.add_blocks("sim-prefill-1", prompt_block_hashes(shared, 16)) == 4
            before = routed("prefill", "sim-prefill-0"), routed("prefill", "sim-prefill-1")
            for i in range(3):
                assert await tokens_of(router, f"px{i}", shared, 4) == simulated_tokens(f"px{i}", shared, 4, VOCAB)
            assert (routed("prefill", "sim-prefill-0"), routed("prefill", "sim-prefill-1")) == (before[0],
                                                                                              before[1] + 3)
            # decode-0 holds 32 of these 40 tokens: the 8 left are under min_prefill_tokens, so the
            # router sends it there without a prefill worker (the worker alone would have asked for one).
            short = [(i * 13) % 1000 + 1 for i in range(40)]
            store.add_blocks("sim-decode-0", prompt_block_hashes(short, 16)[:2])
            prefills = sum(routed("prefill", w) for w in addresses)
            on_d0 = routed("decode", "sim-decode-0")
            assert await tokens_of(router, "local", short, 5) == simulated_tokens("local", short, 5, VOCAB)
            assert sum(routed("prefill", w) for w in addresses) == prefills
            assert routed("decode", "sim-decode-0") == on_d0 + 1
        finally:
            await router.close()

    asyncio.run(body())
