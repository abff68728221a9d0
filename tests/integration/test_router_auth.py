"""API keys and per-key rate limits: two router apps (two replicas, each its own Redis client) over one
real embedded Redis and a simulated worker process. A key's budget is shared by both replicas; keys do
not share budgets; refusals are 401 / 429 with Retry-After in OpenAI's error shape on HTTP and
UNAUTHENTICATED / RESOURCE_EXHAUSTED with a "retry-after" trailing metadata on gRPC."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import httpx
import openai
import pytest
import uvicorn

from cluster.model.tokenizer import Tokenizer
from cluster.protogen import ensure_generated
from cluster.router.auth import AuthConfig, Authenticator
from cluster.router.dispatch import ModelPool
from cluster.router.grpc_api import RETRY_AFTER_METADATA, serve_grpc
from cluster.router.http import create_app
from cluster.state import StateStore
from cluster.state.server import start_embedded_redis
from loadtest.workers import start_cli_worker

ensure_generated()
from pdserve.v1 import serving_pb2 as pb  # noqa: E402
from pdserve.v1 import serving_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "tiny"
# ~no refill during a test: a budget spent stays spent, so the counts below are exact
SLOW = 0.001
CONFIG = {"api_keys": ["sk-a", "sk-b", "sk-tokens"],
          "limits": {"requests_per_s": SLOW, "requests_burst": 3},
          "per_key": {"sk-tokens": {"tokens_per_s": SLOW, "tokens_burst": 100}}}


@pytest.fixture(scope="module")
def replicas(tiny_model_dir):
    """([HTTP base URL of replica 1, of replica 2], gRPC address of replica 1)."""
    redis = start_embedded_redis()
    worker = start_cli_worker(["--role", "simulated", "--vocab-size", "2048", "--ttft-ms", "1", "--itl-ms", "1"],
                              timeout=60)
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stores, servers, bases = [], [], []
    for _ in range(2):
        store = StateStore.from_url(redis.url)
        stores.append(store)
        pools = {MODEL: ModelPool(MODEL, tokenizer, max_model_len=2048, unified=[worker.address])}
        auth = Authenticator(AuthConfig.from_dict(CONFIG), store)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(pools, auth=auth), host="127.0.0.1", port=port,
                                               log_level="warning"))
        servers.append((server, asyncio.run_coroutine_threadsafe(server.serve(), loop)))
        bases.append(f"http://127.0.0.1:{port}")
    grpc_server, grpc_port = asyncio.run_coroutine_threadsafe(serve_grpc(
        {MODEL: ModelPool(MODEL, tokenizer, max_model_len=2048, unified=[worker.address])}, "127.0.0.1", 0,
        auth=Authenticator(AuthConfig.from_dict(CONFIG), stores[0])), loop).result(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(s.started for s, _ in servers):
        time.sleep(0.05)
    yield bases, f"127.0.0.1:{grpc_port}", stores[0]
    asyncio.run_coroutine_threadsafe(grpc_server.stop(1), loop).result(10)
    for server, done in servers:
        server.should_exit = True
        done.result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    worker.stop()
    for store in stores:
        store.close()
    redis.close()


def post(base: str, key: str | None, **body) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}/v1/completions", headers=headers,
                      json={"model": MODEL, "prompt": "hello", "max_tokens": 2, **body})


def test_keys_are_required_where_configured(replicas):
    base = replicas[0][0]
    for headers in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": "sk-a"}):
        r = httpx.post(f"{base}/v1/completions", headers=headers, json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}/v1/models", headers={"authorization": "Bearer sk-b"}).status_code == 200
    assert httpx.get(f"{base}/health").status_code == 200 and httpx.get(f"{base}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="sk-nope", max_retries=0).models.list()


def test_a_keys_request_budget_is_shared_by_replicas(replicas):
    (one, two), _, _ = replicas
    ok = [post(one, "sk-a"), post(two, "sk-a"), post(one, "sk-a")]  # the burst of 3, spent on both replicas
    assert [r.status_code for r in ok] == [200, 200, 200], [r.text for r in ok]
    for base in (two, one):
        refused = post(base, "sk-a")
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(refused.headers["retry-after"]) <= 3 / SLOW
    # another key has its own budget
    assert post(two, "sk-b").status_code == 200
    c = openai.OpenAI(base_url=f"{one}/v1", api_key="sk-a", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        c.completions.create(model=MODEL, prompt="x", max_tokens=2)


def test_token_budget_counts_prompt_and_max_tokens(replicas):
    (one, two), _, _ = replicas
    too_big = post(one, "sk-tokens", max_tokens=200)
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "max_tokens"
    n_times = post(one, "sk-tokens", max_tokens=30, n=4)  # prompt + 4 × 30 > the burst of 100
    assert n_times.status_code == 400 and n_times.json()["error"]["param"] == "max_tokens"
    assert post(one, "sk-tokens", max_tokens=60).status_code == 200  # ~62 of 100 spent
    refused = post(two, "sk-tokens", max_tokens=60)  # the other replica sees what is left
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert post(two, "sk-tokens", max_tokens=20).status_code == 200  # what is left still serves


def test_grpc_keys_and_limits(replicas):
    _, address, _ = replicas
    request = pb.GenerateRequest(model=MODEL, prompt="hello", sampling=pb.GenerateSampling(max_tokens=2))
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.ServingStub(ch)
        for metadata in ((), (("authorization", "Bearer sk-wrong"),)):
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(request, metadata=metadata))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            stub.Models(pb.ModelsRequest())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        key = (("authorization", "Bearer sk-b"),)  # sk-b spent 1 of 3 over HTTP, in the test before
        assert [m.id for m in stub.Models(pb.ModelsRequest(), metadata=key).models] == [MODEL]
        served = 0
        with pytest.raises(grpc.RpcError) as info:
            for _ in range(4):
                assert list(stub.Generate(request, metadata=key))[-1].finish_reason
                served += 1
        assert served >= 1 and info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = dict(info.value.trailing_metadata())[RETRY_AFTER_METADATA]
        assert int(retry) >= 1


def test_the_router_configs_auth_section_is_the_default(tiny_model_dir):
    from cluster.router.core import Router

    pools = {MODEL: ModelPool(MODEL, Tokenizer.from_dir(tiny_model_dir), max_model_len=2048, unified=[])}
    with pytest.raises(ValueError, match="store"):  # limits with no Redis to keep them in
        create_app(Router.from_config(pools, {"auth": CONFIG}))
    transport = httpx.ASGITransport(app=create_app(Router.from_config(pools, {"auth": {"api_keys": ["sk-x"]}})))

    async def statuses() -> list[int]:
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as c:
            return [(await c.get("/v1/models", headers=h)).status_code
                    for h in ({}, {"authorization": "Bearer sk-x"})]

    assert asyncio.run(statuses()) == [401, 200]
