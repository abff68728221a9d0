"""A dying worker loses no request: kill the decode worker (or the unified worker) that is streaming a
request, SIGKILL, mid-stream; the router carries the request on another worker from where it stopped
and the client still gets exactly the unified engine's greedy tokens."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cluster import LLM, SamplingParams
from cluster.model.tokenizer import Tokenizer
from cluster.protogen import ensure_generated
from cluster.router.dispatch import ModelPool
from cluster.router.policy import make_policy
from loadtest.workers import start_worker

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

PROMPT = "A worker that dies must not lose the request it was streaming"
MAX_TOKENS = 40
EXTRA = ["--num-kv-blocks", "128", "--dtype", "float32"]


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=128)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    out = llm.generate([prompt_ids], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))[0]
    return prompt_ids, out.token_ids


async def _running_on(addresses: list[str]) -> list[str]:
    """The workers with a request running now (their own Stats)."""
    busy = []
    for address in addresses:
        async with grpc.aio.insecure_channel(address) as channel:
            stats = await pb_grpc.WorkerStub(channel).Stats(pb.StatsRequest(), timeout=5)
        if stats.num_requests_running:
            busy.append(address)
    return busy


async def _stream_and_kill(pool: ModelPool, prompt_ids: list[int], candidates: list[str], workers: dict):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    tokens: list[int] = []
    killed = None
    async for ids, finish, _ in pool.generate("failover-1", prompt_ids, params):
        tokens.extend(ids)
        if killed is None and len(tokens) >= 4:
            busy = await _running_on(candidates)
            assert len(busy) == 1, busy
            killed = busy[0]
            workers[killed].proc.kill()  # SIGKILL: no goodbye, the stream just breaks
            workers[killed].proc.wait(10)
        if finish is not None:
            break
    return tokens, killed


@pytest.mark.parametrize("layout", ["disaggregated", "unified"])
def test_killing_the_streaming_worker_loses_nothing(tiny_model_dir, expected, layout):
    prompt_ids, expected_ids = expected
    roles = ["prefill", "decode", "decode"] if layout == "disaggregated" else ["unified", "unified"]
    started = [start_worker(role, tiny_model_dir, cpus=None, threads=1, extra=EXTRA) for role in roles]
    try:
        by_role = {role: [w.address for w in started if w.role == role] for role in set(roles)}
        pool = ModelPool("tiny", Tokenizer.from_dir(tiny_model_dir), max_model_len=2048,
                         prefill=by_role.get("prefill", []), decode=by_role.get("decode", []),
                         unified=by_role.get("unified", []))
        pool.policy = make_policy("round_robin", "round_robin")
        streamers = by_role["decode" if layout == "disaggregated" else "unified"]

        async def run():
            try:
                return await _stream_and_kill(pool, prompt_ids, streamers, {w.address: w for w in started})
            finally:
                await pool.close()

        tokens, killed = asyncio.run(run())
        assert killed is not None, "the request finished before a worker could be killed"
        assert tokens == expected_ids
        survivor = next(a for a in streamers if a != killed)
        assert asyncio.run(_running_on([survivor])) == []  # it finished there, nothing left running
    finally:
        for w in started:
            w.stop()
