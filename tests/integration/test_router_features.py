"""The router's request features in front of real prefill and decode worker processes: n choices
(streamed interleaved, usage summed, seeds per choice), logprobs in OpenAI's completions and chat
shapes and on gRPC (equal to the offline engine's within 1e-4), /metrics counting what was served,
and the parameter and error gaps (user, max_completion_tokens, content types, unknown paths)."""

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
from prometheus_client.parser import text_string_to_metric_families

from cluster import LLM, SamplingParams
from cluster.model.tokenizer import Tokenizer
from cluster.protogen import ensure_generated
from cluster.router.dispatch import ModelPool
from cluster.router.grpc_api import serve_grpc
from cluster.router.http import create_app
from loadtest.workers import start_worker

ensure_generated()
from pdserve.v1 import serving_pb2 as pb  # noqa: E402
from pdserve.v1 import serving_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "tiny"
PROMPT = "The quick brown fox"
TOL = 1e-4


@pytest.fixture(scope="module")
def router(tiny_model_dir):
    """(HTTP base URL, gRPC address): both APIs on one event loop over one disaggregated pool."""
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
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not http.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    asyncio.run_coroutine_threadsafe(server.stop(1), loop).result(10)
    http.should_exit = True
    http_done.result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def unified(tiny_model_dir):
    return LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=256)


def client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router[0]}/v1", api_key="unused", max_retries=0)


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_greedy_n_choices_equal_the_single_choice(router, unified):
    want = unified.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    full = client(router).completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, n=2, **GREEDY)
    assert [c.index for c in full.choices] == [0, 1]
    assert [c.text for c in full.choices] == [want.text, want.text]
    assert full.usage.prompt_tokens == len(want.prompt_token_ids) and full.usage.completion_tokens == 20
    chunks = list(client(router).completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, n=2, stream=True,
                                                    stream_options={"include_usage": True}, **GREEDY))
    by_index = {0: "", 1: ""}
    finishes = {}
    for ch in chunks:
        for c in ch.choices:
            by_index[c.index] += c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert by_index == {0: want.text, 1: want.text} and finishes == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == len(want.prompt_token_ids)


def test_seeded_choices_are_reproducible_and_distinct(router):
    c = client(router)
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12, "n": 3,
          "temperature": 1.0, "seed": 1234, "extra_body": {"ignore_eos": True}}
    first = [ch.message.content for ch in c.chat.completions.create(**kw).choices]
    again = [ch.message.content for ch in c.chat.completions.create(**kw).choices]
    assert first == again  # seed + i per choice: the same request gives the same choices
    assert len(set(first)) == 3  # ... and the choices differ from each other
    stream = c.chat.completions.create(**kw, stream=True)
    streamed = ["", "", ""]
    roles = set()
    for ch in stream:
        for choice in ch.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.delta.role:
                roles.add(choice.index)
    assert streamed == first and roles == {0, 1, 2}


def _assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    assert all(abs(g - w) <= TOL for g, w in zip(got, want, strict=True)), (got, want)


def test_completion_logprobs_match_the_engine(router, unified, tiny_model_dir):
    want = unified.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3))[0]
    texts = Tokenizer.from_dir(tiny_model_dir)
    full = client(router).completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=3, **GREEDY)
    lp = full.choices[0].logprobs
    _assert_close(lp.token_logprobs, [t.logprob for t in want.logprobs])
    assert len(lp.tokens) == 8 and lp.text_offset[0] == 0
    for top, engine in zip(lp.top_logprobs, want.logprobs, strict=True):
        assert 3 <= len(top) <= 4  # the top 3, plus the chosen token when it is not among them
        for token_id, value in engine.top:
            text = texts.decode([token_id])
            if "\ufffd" not in text:  # pieces of a character are spelled bytes:..., not decoded
                assert abs(top[text] - value) <= TOL
    chunks = list(client(router).completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=3,
                                                    stream=True, **GREEDY))
    streamed = [v for ch in chunks for c in ch.choices if c.logprobs for v in c.logprobs.token_logprobs]
    offsets = [v for ch in chunks for c in ch.choices if c.logprobs for v in c.logprobs.text_offset]
    _assert_close(streamed, lp.token_logprobs)
    assert offsets == lp.text_offset


def test_chat_logprobs_match_the_engine(router, unified, tiny_model_dir):
    messages = [{"role": "user", "content": "Hello there"}]
    tok = Tokenizer.from_dir(tiny_model_dir)
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    want = unified.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2))[0]
    full = client(router).chat.completions.create(model=MODEL, messages=messages, max_tokens=8, logprobs=True,
                                                  top_logprobs=2, **GREEDY)
    content = full.choices[0].logprobs.content
    _assert_close([c.logprob for c in content], [t.logprob for t in want.logprobs])
    for entry, engine in zip(content, want.logprobs, strict=True):
        _assert_close([t.logprob for t in entry.top_logprobs], [v for _, v in engine.top])
    assert b"".join(bytes(c.bytes) for c in content).decode(errors="replace") == full.choices[0].message.content
    stream = client(router).chat.completions.create(model=MODEL, messages=messages, max_tokens=8, logprobs=True,
                                                    top_logprobs=2, stream=True, **GREEDY)
    streamed = [e for ch in stream for c in ch.choices if c.logprobs for e in c.logprobs.content]
    assert [e.token for e in streamed] == [c.token for c in content]
    _assert_close([e.logprob for e in streamed], [c.logprob for c in content])


def test_grpc_logprobs_and_choices(router, unified):
    want = unified.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2))[0]
    with grpc.insecure_channel(router[1]) as ch:
        got = list(pb_grpc.ServingStub(ch).Generate(pb.GenerateRequest(model=MODEL, prompt=PROMPT, sampling=(
            pb.GenerateSampling(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2, n=2)))))
    for index in (0, 1):
        mine = [r for r in got if r.index == index]
        assert [t for r in mine for t in r.token_ids] == list(want.token_ids)
        lps = [lp for r in mine for lp in r.logprobs]
        assert [lp.token_id for lp in lps] == list(want.token_ids)
        _assert_close([lp.logprob for lp in lps], [t.logprob for t in want.logprobs])
        assert [[t.token_id for t in lp.top_logprobs] for lp in lps] == [[i for i, _ in t.top] for t in want.logprobs]
        assert mine[-1].finish_reason == "length"
    assert got[-1].usage.completion_tokens == 12 and not any(r.HasField("usage") for r in got[:-1])


def _samples(base: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{base}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_was_served(router):
    r = httpx.get(f"{router[0]}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    before = _samples(router[0])
    c = client(router)
    c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, **GREEDY)
    list(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True, **GREEDY))
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt=PROMPT, max_tokens=4)
    after = _samples(router[0])

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("pdserve:requests_total", model=MODEL, status="length") == 2
    assert moved("pdserve:requests_total", model="", status="invalid") == 1
    assert moved("pdserve:generation_tokens_total", model=MODEL) == 9
    assert moved("pdserve:time_to_first_token_seconds_count", model=MODEL) == 2
    assert moved("pdserve:e2e_request_latency_seconds_count", model=MODEL) == 2
    assert moved("pdserve:inter_token_latency_seconds_count", model=MODEL) >= 3  # at least one gap per later chunk
    assert moved("pdserve:prompt_tokens_total", model=MODEL) > 0


def test_parameter_and_error_gaps(router):
    base = router[0]
    got = client(router).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3, user="alice",
        temperature=0, extra_body={"ignore_eos": True, "priority": 1, "top_k": 5, "min_p": 0.1,
                                   "repetition_penalty": 1.1, "min_tokens": 2})
    assert got.usage.completion_tokens == 3
    r = httpx.post(f"{base}/v1/completions", content=b'{"model": "tiny", "prompt": "x"}',
                   headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{base}/v1/completions", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)):
        r = httpx.request(method, f"{base}{path}")
        assert r.status_code == status and r.json()["error"]["message"]
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                         "logprobs": True, "top_logprobs": 99})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = httpx.post(f"{base}/v1/completions", json=[1, 2])
    assert r.status_code == 400 and "object" in r.json()["error"]["message"]
