"""Per-stream results of the router-capacity benchmark, worked out after the run from what the
clients recorded (loadtest/stream_clients.py), and the figures over the measured window.

A stream through the router: its SSE events are parsed → the router's request id (in every chunk)
gives the simulated worker's tokens for it (a hash of the id and the prompt) → they go through the
same incremental detokenizer the router uses, which gives the text the router should have sent and
how long it is after each token → the chunks must add up to that text (a prefix of it if the stream
was cut), and each chunk's arrival is the arrival of the token whose text completes it. A token the
detokenizer held back (random ids can end inside a UTF-8 character) comes with a later one; it has
no arrival of its own and is counted as held back. A stream straight to the workers carries token
ids, checked against the same hash, one arrival each.

In the window: TTFT of the streams sent in it, and for each token i ≥ 1 that arrived in it, its delay
against the worker's schedule (arrival − request sent − i·itl) and the gap to token i − 1 when both
came in chunks of their own.
"""

from __future__ import annotations

import bisect
import collections
import json
from dataclasses import dataclass, field

from cluster.engine.detokenizer import IncrementalDetokenizer
from cluster.model.tokenizer import Tokenizer
from cluster.worker.simulated import request_seed, token_at
from loadtest.disagg_bench import pct
from loadtest.stream_clients import StreamRecord, parse_sse


@dataclass
class Setup:
    """What the analysis needs to know about the run."""

    tokenizer: Tokenizer
    prompt_ids: list[int]
    max_tokens: int
    vocab_size: int
    itl_s: float


@dataclass
class Stream:
    """One stream after parsing: token index → arrival time for tokens that came in their own chunk."""

    send: float
    arrivals: dict[int, float] = field(default_factory=dict)
    deliveries: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens it completed)
    num_held: int = 0  # tokens the detokenizer joined to a later chunk
    error: str | None = None
    is_cut: bool = False


def worker_tokens(setup: Setup, request_id: str, num_tokens: int) -> list[int]:
    """The first num_tokens tokens the simulated workers send for this request."""
    seed = request_seed(request_id, setup.prompt_ids)
    return [token_at(seed, i, setup.vocab_size) for i in range(num_tokens)]


def direct_result(record: StreamRecord, setup: Setup) -> Stream:
    stream = Stream(record.send, error=record.error, is_cut=record.is_cut)
    if stream.error is None:
        if record.token_ids != worker_tokens(setup, record.request_id, len(record.token_ids)):
            stream.error = "wrong_tokens"
        elif record.is_done and len(record.token_ids) != setup.max_tokens:
            stream.error = "incomplete"
    stream.arrivals = dict(enumerate(record.times))
    stream.deliveries = [(t, 1) for t in record.times]
    return stream


def reference_text(setup: Setup, request_id: str, min_length: int | None) -> tuple[list[int], str]:
    """The text the router should send for this request: (cumulative length after each of the worker's
    tokens, the text). With `min_length`, only as many tokens as that much text takes (a cut stream)."""
    detok = IncrementalDetokenizer(setup.tokenizer.backend, setup.prompt_ids, stop=[])
    seed = request_seed(request_id, setup.prompt_ids)
    cumulative, total = [], 0
    for i in range(setup.max_tokens):
        total += len(detok.update([token_at(seed, i, setup.vocab_size)]))
        if i + 1 == setup.max_tokens:
            total += len(detok.finish())
        cumulative.append(total)
        if min_length is not None and total >= min_length:
            break
    return cumulative, detok.output_text


def router_result(record: StreamRecord, setup: Setup) -> Stream:
    stream = Stream(record.send, error=record.error, is_cut=record.is_cut)
    response = parse_sse(record)
    if stream.error is not None:
        return stream
    if response.status == 0:  # nothing came back: fine if cut before the headers
        stream.error = None if record.is_cut else "no_response"
        return stream
    if response.status != 200:
        stream.error = f"http_{response.status}"
        return stream
    request_id, texts, times, usage, is_finished = "", [], [], None, False
    for arrival, data in response.events:
        if data == b"[DONE]":
            is_finished = True
            continue
        event = json.loads(data)
        if "error" in event:
            stream.error = f"stream_{event['error'].get('type', 'error')}"
            return stream
        request_id = request_id or event["id"]
        if event.get("usage"):
            usage = event["usage"]["completion_tokens"]
        elif event["choices"] and event["choices"][0]["text"]:
            texts.append(event["choices"][0]["text"])
            times.append(arrival)
    if record.is_done and (not is_finished or usage != setup.max_tokens):
        stream.error = "incomplete"
        return stream
    if not texts:
        return stream
    got = "".join(texts)
    cumulative, full = reference_text(setup, request_id, None if record.is_done else len(got))
    if got != full[:len(got)] or (record.is_done and got != full):
        stream.error = "wrong_text"
        return stream
    total, last = 0, -1
    for text, arrival in zip(texts, times, strict=True):
        total += len(text)
        index = bisect.bisect_left(cumulative, total)  # the token whose text completes this chunk
        stream.arrivals[index] = arrival
        stream.deliveries.append((arrival, index - last))
        stream.num_held += index - last - 1
        last = index
    return stream


@dataclass
class RunStats:
    streams: int = 0
    completed: int = 0
    cut: int = 0
    errors: int = 0
    errors_by_type: dict[str, int] = field(default_factory=dict)
    held_min: int = 0
    held_peak: int = 0
    ttft: list[float] = field(default_factory=list)
    delay: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    num_tokens: int = 0  # delivered in the window, held-back ones included
    num_held_back: int = 0  # over the whole run
    num_first_held: int = 0  # streams sent in the window whose first token was held back: no TTFT
    cpu: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("ttft", "delay", "itl")}
        for name in ("ttft", "delay", "itl"):
            values = sorted(getattr(self, name))
            out[f"{name}_n"] = len(values)
            out[f"{name}_p50"], out[f"{name}_p99"] = pct(values, 50), pct(values, 99)
        return out


def window_stats(streams: list[Stream], window: tuple[float, float], setup: Setup) -> RunStats:
    start, end = window
    stats = RunStats(streams=len(streams))
    errors = collections.Counter(s.error for s in streams if s.error is not None)
    stats.errors, stats.errors_by_type = sum(errors.values()), dict(errors)
    stats.cut = sum(1 for s in streams if s.error is None and s.is_cut)
    stats.completed = sum(1 for s in streams if s.error is None and not s.is_cut)
    for s in streams:
        if s.error is not None:
            continue
        if start <= s.send < end and s.deliveries:
            if 0 in s.arrivals:
                stats.ttft.append(s.arrivals[0] - s.send)
            else:
                stats.num_first_held += 1
        stats.num_tokens += sum(n for arrival, n in s.deliveries if start <= arrival < end)
        for i, arrival in s.arrivals.items():
            if i == 0 or not start <= arrival < end:
                continue
            stats.delay.append(arrival - s.send - i * setup.itl_s)
            if i - 1 in s.arrivals:
                stats.itl.append(arrival - s.arrivals[i - 1])
        stats.num_held_back += s.num_held
    return stats
