"""The router's public gRPC API in front of real prefill and decode worker processes, through a
client generated from protos/: greedy tokens equal the unified engine's, text equals the HTTP API's,
chat uses the chat template, health answers SERVING, reflection lists the services, and bad input
gets INVALID_ARGUMENT naming the field (NOT_FOUND for an unknown model)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import httpx
import pytest
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster import LLM, SamplingParams
from cluster.model.tokenizer import Tokenizer
from cluster.protogen import ensure_generated
from cluster.router.dispatch import ModelPool
from cluster.router.errors import APIError
from cluster.router.grpc_api import FIELD_METADATA, serve_grpc
from cluster.router.http import create_app
from loadtest.workers import start_worker

ensure_generated()
from pdserve.v1 import serving_pb2 as pb  # noqa: E402
from pdserve.v1 import serving_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "tiny"


@pytest.fixture(scope="module")
def router(tiny_model_dir):
    """(gRPC address, HTTP base URL): both APIs on one event loop over the same pool."""
    workers = [start_worker(role, tiny_model_dir, cpus=None, threads=1,
                            extra=["--num-kv-blocks", "256", "--dtype", "float32"]) for role in ("prefill", "decode")]
    pool = ModelPool(MODEL, Tokenizer.from_dir(tiny_model_dir), max_model_len=2048,
                     prefill=[workers[0].address], decode=[workers[1].address])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, grpc_port = asyncio.run_coroutine_threadsafe(serve_grpc({MODEL: pool}, "127.0.0.1", 0), loop).result(30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    http = uvicorn.Server(uvicorn.Config(create_app({MODEL: pool}), host="127.0.0.1", port=http_port,
                                         log_level="warning"))
    http_done = asyncio.run_coroutine_threadsafe(http.serve(), loop)
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not http.started:
        time.sleep(0.05)
    yield f"127.0.0.1:{grpc_port}", base
    asyncio.run_coroutine_threadsafe(server.stop(1), loop).result(10)
    http.should_exit = True
    http_done.result(10)  # its lifespan closes the pool
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def channel(router):
    with grpc.insecure_channel(router[0]) as ch:
        yield ch


@pytest.fixture(scope="module")
def unified(tiny_model_dir):
    return LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=256)


def greedy(max_tokens: int, **kw) -> pb.GenerateSampling:
    return pb.GenerateSampling(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def test_stream_equals_unified_engine_and_http_text(router, channel, unified):
    prompt = "The quick brown fox"
    want = unified.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stub = pb_grpc.ServingStub(channel)
    got = list(stub.Generate(pb.GenerateRequest(model=MODEL, prompt=prompt, sampling=greedy(12), request_id="r1")))
    assert [t for r in got for t in r.token_ids] == list(want.token_ids)
    text = "".join(r.text for r in got)
    assert text == want.text
    assert all(r.model == MODEL and r.request_id == "r1" for r in got)
    assert [r.finish_reason for r in got[:-1]] == [""] * (len(got) - 1) and got[-1].finish_reason == "length"
    usage = got[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(want.prompt_token_ids), 12)
    assert usage.total_tokens == usage.prompt_tokens + 12
    http = httpx.post(f"{router[1]}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                                          "temperature": 0, "ignore_eos": True}).json()
    assert http["choices"][0]["text"] == text
    by_ids = list(stub.Generate(pb.GenerateRequest(model=MODEL, prompt_token_ids=want.prompt_token_ids,
                                                   sampling=greedy(12))))
    assert [t for r in by_ids for t in r.token_ids] == list(want.token_ids)


def test_stop_strings_cut_the_text_as_on_http(router, channel, unified):
    free = unified.generate(["Once upon"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].text
    stop = free[4:7]
    got = list(pb_grpc.ServingStub(channel).Generate(
        pb.GenerateRequest(model=MODEL, prompt="Once upon", sampling=greedy(16, stop=[stop]))))
    http = httpx.post(f"{router[1]}/v1/completions", json={"model": MODEL, "prompt": "Once upon", "max_tokens": 16,
                                                          "temperature": 0, "ignore_eos": True, "stop": [stop]}).json()
    assert "".join(r.text for r in got) == http["choices"][0]["text"] == free[: free.index(stop)]
    assert got[-1].finish_reason == "stop"


def test_chat_uses_the_chat_template(channel, unified, tiny_model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    tok = Tokenizer.from_dir(tiny_model_dir)
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    want = unified.generate([ids], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    got = list(pb_grpc.ServingStub(channel).Generate(pb.GenerateRequest(
        model=MODEL, messages=[pb.ChatMessage(**m) for m in messages], sampling=greedy(10))))
    assert "".join(r.text for r in got) == want.text
    assert got[-1].usage.prompt_tokens == len(ids) and got[-1].usage.completion_tokens == 10


def test_models_health_and_reflection(channel):
    models = pb_grpc.ServingStub(channel).Models(pb.ModelsRequest()).models
    assert [(m.id, m.ready, m.max_model_len) for m in models] == [(MODEL, True, 2048)]
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "pdserve.v1.Serving"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"pdserve.v1.Serving", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    ("request_kw", "code", "field"),
    [
        ({"model": MODEL}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"prompt": "x"}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
        ({"model": MODEL, "prompt": "x", "prompt_token_ids": [1]}, grpc.StatusCode.INVALID_ARGUMENT,
         "prompt_token_ids"),
        ({"model": MODEL, "prompt": "x", "sampling": pb.GenerateSampling(temperature=-1)},
         grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ({"model": MODEL, "prompt": "x", "sampling": pb.GenerateSampling(top_p=2)},
         grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"model": MODEL, "prompt": "x", "sampling": pb.GenerateSampling(max_tokens=0)},
         grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"model": MODEL, "prompt_token_ids": [5] * 3000}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"model": MODEL, "prompt_token_ids": [1 << 20]}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"model": MODEL, "messages": [pb.ChatMessage(role="bot", content="x")]},
         grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        ({"model": "nope", "prompt": "x"}, grpc.StatusCode.NOT_FOUND, "model"),
    ],
)
def test_bad_input_gets_a_status_naming_the_field(channel, request_kw, code, field):
    with pytest.raises(grpc.RpcError) as info:
        list(pb_grpc.ServingStub(channel).Generate(pb.GenerateRequest(**request_kw)))
    assert info.value.code() == code, info.value.details()
    assert info.value.details().startswith(field)
    assert (FIELD_METADATA, field) in tuple(info.value.trailing_metadata())


class _OverloadedPool(ModelPool):
    async def generate(self, request_id, prompt_ids, params):
        raise APIError(429, "the workers are full", None, "rate_limit_error")
        yield  # an async generator, as the real one


def test_overload_and_no_worker_statuses_and_not_serving(tiny_model_dir):
    tok = Tokenizer.from_dir(tiny_model_dir)
    pools = {"idle": ModelPool("idle", tok, 2048), "busy": _OverloadedPool("busy", tok, 2048, unified=["unused:1"])}

    async def run() -> None:
        server, port = await serve_grpc(pools, "127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.ServingStub(ch)
                for model, code in (("idle", grpc.StatusCode.UNAVAILABLE), ("busy", grpc.StatusCode.RESOURCE_EXHAUSTED)):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        [r async for r in stub.Generate(pb.GenerateRequest(model=model, prompt="x"))]
                    assert info.value.code() == code, info.value.details()
                status = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            await server.stop(None)

    asyncio.run(run())
