"""What the benchmark's backends send (loadtest/backends.py), built without a server: the OpenAI body
(streamed with usage, ignore_eos, token ids or text, extra_body), the gRPC Generate request, the URL
joined as the openai client joins it, and bad settings named by field."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from loadtest.backends import BackendConfig, GrpcBackend, OpenAIBackend, RequestError, error_type
from loadtest.prompts import Prompt
from loadtest.sessions import Input
from loadtest.workload import RequestSpec

INPUT = Input(text="hello world", ids=[7, 8, 9], messages=[{"role": "user", "content": "hello world"}], num_tokens=3)
SPEC = RequestSpec(0, Prompt("hello world", [7, 8, 9], 3), max_tokens=5)


def payload(**kw) -> dict:
    async def build() -> dict:
        backend = OpenAIBackend(BackendConfig(model="m", **kw))
        try:
            return backend.payload(INPUT, SPEC)
        finally:
            await backend.close()

    return asyncio.run(build())


def test_completions_body_streams_with_usage_and_asks_for_the_full_length():
    body = payload(use_token_ids=True)
    assert body == {"model": "m", "max_tokens": 5, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True, "prompt": [7, 8, 9]}
    assert payload()["prompt"] == "hello world"  # text unless the server takes ids
    body = payload(kind="openai-chat", ignore_eos=False, extra_body={"top_k": 1, "temperature": 0.5})
    assert body["messages"] == INPUT.messages and "prompt" not in body and "ignore_eos" not in body
    assert body["top_k"] == 1 and body["temperature"] == 0.5  # extra_body has the last word


@pytest.mark.parametrize("base, kind, url", [
    ("http://h:1", "openai", "http://h:1/v1/completions"),
    ("http://h:1/", "openai-chat", "http://h:1/v1/chat/completions"),
    ("https://h/v1", "openai", "https://h/v1/completions"),  # as the openai client's base_url
])
def test_urls(base, kind, url):
    assert BackendConfig(kind=kind, base_url=base).url == url


def test_grpc_request():
    async def build() -> None:
        backend = GrpcBackend(BackendConfig(kind="grpc", model="m", use_token_ids=True))
        try:
            request = backend.request(INPUT, SPEC)
            assert list(request.prompt_token_ids) == [7, 8, 9] and request.model == "m"
            assert request.sampling.max_tokens == 5 and request.sampling.ignore_eos
            assert request.sampling.HasField("temperature") and request.sampling.temperature == 0
            chat = GrpcBackend(BackendConfig(kind="grpc-chat", model="m"))
            assert [m.content for m in chat.request(INPUT, SPEC).messages] == ["hello world"]
            await chat.close()
        finally:
            await backend.close()

    asyncio.run(build())


def test_error_types():
    assert error_type(RequestError("http_429", "slow down")) == "http_429"
    assert error_type(TimeoutError()) == "timeout"
    rpc = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata())
    assert error_type(rpc) == "grpc_RESOURCE_EXHAUSTED"
    assert error_type(KeyError("x")) == "KeyError"


@pytest.mark.parametrize("kwargs, field", [
    ({"kind": "rest"}, "backend"),
    ({"base_url": "localhost:8000"}, "base_url"),
    ({"endpoint": "v1/completions"}, "endpoint"),
    ({"timeout_s": 0}, "timeout"),
    ({"temperature": -1}, "temperature"),
])
def test_bad_backend_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BackendConfig(**kwargs)
