"""Admission and model routing seen from clients, in front of simulated worker processes: the official
openai client gets 429 with Retry-After once a model's queue is full, a client that gives up while
queued leaves the queue; the `auto` alias sends each request to the model its rules pick (or spills
it over to another model when the first is full), and the response — HTTP or gRPC — names the model
that served."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import openai
import pytest
import uvicorn

from cluster.metrics import REGISTRY
from cluster.model.tokenizer import Tokenizer
from cluster.protogen import ensure_generated
from cluster.router.config import RouterConfig
from cluster.router.core import Router
from cluster.router.dispatch import ModelPool
from cluster.router.grpc_api import serve_grpc
from cluster.router.http import create_app
from loadtest.workers import start_cli_worker

ensure_generated()
from pdserve.v1 import serving_pb2 as spb  # noqa: E402
from pdserve.v1 import serving_pb2_grpc as spb_grpc  # noqa: E402

HOLD = {"max_tokens": 100_000, "stream": True, "extra_body": {"ignore_eos": True}}
AUTO = {
    "auto": {"default": "small", "rules": [{"model": "large", "min_prompt_tokens": 30},
                                           {"model": "large", "keywords": ["prove"]}]},
    "aliases": {"fast": "small"},
}


@pytest.fixture(scope="module")
def workers() -> Iterator[list[str]]:
    """Two simulated worker processes, each a whole (unified) pool: one per model."""
    procs = []
    try:
        for _ in range(2):
            procs.append(start_cli_worker(["--role", "simulated", "--vocab-size", "2048", "--ttft-ms", "10",
                                           "--itl-ms", "20"], timeout=60))
        yield [p.address for p in procs]
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


def router_for(tokenizer: Tokenizer, workers: list[str], config: dict) -> Router:
    pools = {name: ModelPool(name, tokenizer, 2048, unified=[address])
             for name, address in zip(("small", "large"), workers, strict=True)}
    return Router(pools, RouterConfig.from_dict(config))


@contextlib.contextmanager
def serving(router: Router) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(router), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the router did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


async def wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def routed(model: str, worker: str) -> float:
    labels = {"model": model, "pool": "unified", "worker": worker}
    return REGISTRY.get_sample_value("pdserve:requests_routed_total", labels) or 0.0


def test_a_full_queue_gets_429_with_retry_after_and_a_client_that_leaves_the_queue_is_gone(tokenizer, workers):
    router = router_for(tokenizer, workers, {"admission": {"max_in_flight": 1, "max_queue": 1, "retry_after_s": 2}})
    admission = router.admission["small"]

    async def body(base: str) -> None:
        client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
        try:
            held = await client.completions.create(model="small", prompt="hold the slot", **HOLD)
            await anext(held)
            queued = asyncio.create_task(client.completions.create(model="small", prompt="wait", max_tokens=4))
            await wait_for(lambda: admission.num_queued == 1)
            with pytest.raises(openai.RateLimitError) as info:
                await client.completions.create(model="small", prompt="one too many", max_tokens=4)
            assert info.value.status_code == 429 and info.value.response.headers["retry-after"] == "2"
            assert info.value.type == "rate_limit_error" and "small" in info.value.message
            # The other model has its own queue.
            assert (await client.completions.create(model="large", prompt="x", max_tokens=2)).model == "large"
            queued.cancel()  # the client gives up while queued: its request leaves the queue
            await wait_for(lambda: admission.num_queued == 0)
            assert admission.num_in_flight == 1
            await held.close()
            await wait_for(lambda: admission.num_in_flight == 0)
            done = await client.completions.create(model="small", prompt="room again", max_tokens=3,
                                                   extra_body={"ignore_eos": True})
            assert done.usage.completion_tokens == 3
        finally:
            await client.close()

    with serving(router) as base:
        asyncio.run(body(base))


def test_auto_routes_by_the_rules_and_the_response_names_the_model_that_served(tokenizer, workers):
    router = router_for(tokenizer, workers, AUTO)
    short, long = "Hi there", "Tell me everything about disaggregated serving " * 5
    assert len(tokenizer.encode(short)) < 30 <= len(tokenizer.encode(long))

    with serving(router) as base:
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        before = routed("small", workers[0]), routed("large", workers[1])
        answers = [
            client.completions.create(model="auto", prompt=short, max_tokens=3).model,
            client.completions.create(model="auto", prompt=long, max_tokens=3).model,
            client.chat.completions.create(model="auto", max_tokens=3,
                                           messages=[{"role": "user", "content": "Can you prove it?"}]).model,
            client.chat.completions.create(model="fast", max_tokens=3,
                                           messages=[{"role": "user", "content": "prove it"}]).model,
        ]
        streamed = list(client.completions.create(model="auto", prompt=long, max_tokens=3, stream=True))
    assert answers == ["small", "large", "large", "small"]  # "fast" is a plain alias: no rules
    assert {chunk.model for chunk in streamed} == {"large"}
    assert (routed("small", workers[0]), routed("large", workers[1])) == (before[0] + 2, before[1] + 3)

    async def over_grpc() -> list[str]:
        grpc_router = router_for(tokenizer, workers, AUTO)
        server, port = await serve_grpc(grpc_router, "127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = spb_grpc.ServingStub(channel)
                sampling = spb.GenerateSampling(max_tokens=2)
                return [[r.model async for r in stub.Generate(spb.GenerateRequest(model="auto", prompt=p,
                                                                                  sampling=sampling))][-1]
                        for p in (short, long)]
        finally:
            await server.stop(None)
            await grpc_router.close()

    assert asyncio.run(over_grpc()) == ["small", "large"]


def test_a_full_model_spills_over_to_its_spill_over_model(tokenizer, workers):
    config = {**AUTO, "spill_over": {"small": "large"}, "admission": {"max_in_flight": 1, "max_queue": 0}}
    router = router_for(tokenizer, workers, config)

    def spilled() -> float:
        return REGISTRY.get_sample_value("pdserve:requests_spilled_total", {"model": "small", "to_model": "large"}) or 0

    async def body(base: str) -> None:
        client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
        try:
            on_small = await client.completions.create(model="auto", prompt="short one", **HOLD)
            first = await anext(on_small)
            assert first.model == "small"
            before = spilled()
            on_large = await client.completions.create(model="auto", prompt="short two", **HOLD)
            assert (await anext(on_large)).model == "large"  # small was full
            assert spilled() == before + 1
            with pytest.raises(openai.RateLimitError):  # both full: small's own (empty) queue refuses it
                await client.completions.create(model="auto", prompt="short three", max_tokens=2)
            await on_small.close()
            await wait_for(lambda: router.admission["small"].num_in_flight == 0)
            assert (await client.completions.create(model="auto", prompt="short four", max_tokens=2)).model == "small"
            await on_large.close()
        finally:
            await client.close()

    with serving(router) as base:
        asyncio.run(body(base))
