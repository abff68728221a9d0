"""The router-capacity benchmark's analysis (loadtest/stream_stats.py): a recorded SSE response is
parsed, its text checked against the simulated worker's tokens, and each chunk timed to its token."""

from __future__ import annotations

import json

import pytest

from cluster.engine.detokenizer import IncrementalDetokenizer
from cluster.model.tokenizer import Tokenizer
from loadtest.stream_clients import StreamRecord, parse_sse
from loadtest.stream_stats import Setup, direct_result, router_result, window_stats, worker_tokens

MAX_TOKENS, ITL = 12, 0.1


@pytest.fixture(scope="module")
def setup(tiny_model_dir) -> Setup:
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    return Setup(tokenizer, tokenizer.encode("hello there"), MAX_TOKENS, tokenizer.vocab_size, ITL)


def deltas(setup: Setup, request_id: str) -> list[str]:
    """What the router sends per worker token (one chunk per non-empty delta)."""
    detok = IncrementalDetokenizer(setup.tokenizer.backend, setup.prompt_ids, stop=[])
    out = []
    for i, token in enumerate(worker_tokens(setup, request_id, MAX_TOKENS)):
        delta = detok.update([token])
        out.append(delta + (detok.finish() if i + 1 == MAX_TOKENS else ""))
    return out


def http_record(events: list[str], *, status: int = 200, done: bool = True, send: float = 10.0) -> StreamRecord:
    """A chunked response as the raw client records it: one TCP read per event, 0.1 s apart."""
    record = StreamRecord(slot=0, send=send, is_done=done, is_cut=not done)
    record.blocks.append(f"HTTP/1.1 {status} OK\r\ncontent-type: text/event-stream\r\n"
                         "transfer-encoding: chunked\r\n\r\n".encode())
    record.times.append(send + 0.01)
    for i, event in enumerate(events):
        data = f"data: {event}\n\n".encode()
        record.blocks.append(b"%x\r\n" % len(data) + data + b"\r\n")
        record.times.append(send + 0.05 + i * ITL)
    if done:
        record.blocks[-1] += b"0\r\n\r\n"
    return record


def sse_events(request_id: str, texts: list[str], usage: int | None) -> list[str]:
    head = {"id": request_id, "object": "text_completion", "created": 1, "model": "tiny"}
    events = [json.dumps({**head, "choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": None}]})
              for t in texts if t]
    if usage is not None:
        events.append(json.dumps({**head, "choices": [], "usage": {"completion_tokens": usage}}))
        events.append("[DONE]")
    return events


def test_a_faithful_stream_times_each_token_and_counts_the_held_ones(setup):
    rid = "cmpl-abc"
    per_token = deltas(setup, rid)
    record = http_record(sse_events(rid, per_token, MAX_TOKENS))
    assert parse_sse(record).status == 200 and len(parse_sse(record).events) == sum(1 for d in per_token if d) + 2
    stream = router_result(record, setup)
    assert stream.error is None
    own = [i for i, d in enumerate(per_token) if d]  # tokens whose text came in a chunk of their own
    assert sorted(stream.arrivals) == own
    assert stream.num_held == len(per_token) - len(own) - (len(per_token) - 1 - own[-1])
    assert [n for _, n in stream.deliveries] == [b - a for a, b in zip([-1, *own], own, strict=False)]
    stats = window_stats([stream], (0.0, 100.0), setup)
    assert stats.errors == 0 and stats.num_tokens == own[-1] + 1 and len(stats.delay) == len(own) - (0 in own)


def test_wrong_text_missing_usage_and_http_errors_are_errors(setup):
    rid = "cmpl-abc"
    per_token = deltas(setup, rid)
    tampered = [*per_token]
    k = next(i for i, d in enumerate(tampered) if d)
    tampered[k] = "X" + tampered[k]
    assert router_result(http_record(sse_events(rid, tampered, MAX_TOKENS)), setup).error == "wrong_text"
    # The same text under another request id is another worker stream: wrong too.
    assert router_result(http_record(sse_events("cmpl-other", per_token, MAX_TOKENS)), setup).error == "wrong_text"
    assert router_result(http_record(sse_events(rid, per_token, MAX_TOKENS - 1)), setup).error == "incomplete"
    assert router_result(http_record(sse_events(rid, per_token, None)), setup).error == "incomplete"
    busy = StreamRecord(slot=0, send=1.0, is_done=True, times=[1.1],
                        blocks=[b'HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}'])
    assert router_result(busy, setup).error == "http_429"


def test_a_cut_stream_is_checked_as_a_prefix_and_is_no_error(setup):
    rid = "cmpl-cut"
    per_token = deltas(setup, rid)
    cut = http_record(sse_events(rid, per_token[:5], None), done=False)
    stream = router_result(cut, setup)
    assert stream.error is None and stream.is_cut
    wrong = [*per_token[:5]]
    k = next(i for i, d in enumerate(wrong) if d)
    wrong[k] = wrong[k] + "Z"
    assert router_result(http_record(sse_events(rid, wrong, None), done=False), setup).error == "wrong_text"


def test_direct_streams_are_checked_against_the_worker_tokens(setup):
    record = StreamRecord(slot=0, send=1.0, request_id="direct-0-0", is_done=True)
    record.token_ids = worker_tokens(setup, "direct-0-0", MAX_TOKENS)
    record.times = [1.05 + i * ITL for i in range(MAX_TOKENS)]
    stream = direct_result(record, setup)
    assert stream.error is None and sorted(stream.arrivals) == list(range(MAX_TOKENS))
    stats = window_stats([stream], (0.0, 100.0), setup)
    assert stats.ttft == [pytest.approx(0.05)] and all(d == pytest.approx(0.05) for d in stats.delay)
    assert all(g == pytest.approx(ITL) for g in stats.itl)
    record.token_ids = [*record.token_ids[:-1], (record.token_ids[-1] + 1) % setup.vocab_size]
    assert direct_result(record, setup).error == "wrong_tokens"
