"""The router's OpenAI API, checked with the official `openai` client, in front of real prefill and
decode worker processes: greedy outputs equal the unified engine's, streamed text equals the
non-streamed text, usage counts are right, and bad input gets a 4xx in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from cluster import LLM, SamplingParams
from cluster.model.tokenizer import Tokenizer
from cluster.router.dispatch import ModelPool
from cluster.router.http import create_app
from loadtest.workers import start_worker

MODEL = "tiny"


@pytest.fixture(scope="module")
def router(tiny_model_dir):
    workers = [start_worker(role, tiny_model_dir, cpus=None, threads=1,
                            extra=["--num-kv-blocks", "256", "--dtype", "float32"]) for role in ("prefill", "decode")]
    pool = ModelPool(MODEL, Tokenizer.from_dir(tiny_model_dir), max_model_len=2048,
                     prefill=[workers[0].address], decode=[workers[1].address])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app({MODEL: pool}), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/ready").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield base
    server.should_exit = True
    thread.join(10)
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def unified(tiny_model_dir):
    return LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=256)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_completion_equals_unified_and_streaming_equals_non_streaming(router, unified):
    prompt = "The quick brown fox"
    want = unified.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    c = client(router)
    extra = {"ignore_eos": True}
    full = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body=extra)
    assert full.choices[0].text == want.text
    assert full.usage.completion_tokens == len(want.token_ids) == 12
    assert full.usage.prompt_tokens == len(want.prompt_token_ids)
    assert full.model == MODEL and full.choices[0].finish_reason == "length"
    chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body=extra))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_chat_uses_the_chat_template(router, unified, tiny_model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    tok = Tokenizer.from_dir(tiny_model_dir)
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    want = unified.generate([ids], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    c = client(router)
    full = c.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert full.choices[0].message.content == want.text and full.choices[0].message.role == "assistant"
    assert full.usage.prompt_tokens == len(ids)
    stream = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text


def test_async_client_streams_concurrently(router, unified):
    prompts = ["one", "two two", "three three three"]
    want = [o.text for o in unified.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))]

    async def run() -> list[str]:
        c = openai.AsyncOpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0)

        async def one(p: str) -> str:
            stream = await c.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
            return "".join([ch.choices[0].text async for ch in stream if ch.choices])

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await c.close()

    assert asyncio.run(run()) == want


def test_stop_strings_cut_the_text(router, unified):
    free = unified.generate(["Once upon"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].text
    stop = free[4:7]
    got = client(router).completions.create(model=MODEL, prompt="Once upon", max_tokens=16, temperature=0,
                                            stop=[stop], extra_body={"ignore_eos": True})
    assert got.choices[0].text == free[: free.index(stop)] and got.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "top_p": 2}, 400, "top_p"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "bogus": 1}, 400, "bogus"),
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": MODEL, "prompt": [5] * 3000}, 400, "prompt"),
        ({"prompt": "x"}, 400, "model"),
    ],
)
def test_bad_input_gets_an_openai_error(router, body, status, param):
    r = httpx.post(f"{router}/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    assert httpx.get(f"{router}/health").status_code == 200


def test_malformed_and_oversized_bodies(router):
    r = httpx.post(f"{router}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{router}/v1/completions", content=b"x" * (5 << 20))
    assert r.status_code == 413
    r = httpx.post(f"{router}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "bot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    ok = client(router).completions.create(model=MODEL, prompt="still serving", max_tokens=3)
    assert ok.usage.completion_tokens >= 1


def test_models_and_readiness(router):
    assert [m.id for m in client(router).models.list()] == [MODEL]
    assert httpx.get(f"{router}/ready").json()["status"] == "ready"
