"""Many concurrent token streams from one asyncio process, timed per chunk: through the router's SSE
API (httpx) or straight to simulated workers over gRPC (the router's own disaggregated call sequence).

Both clients fire all N streams at once and record, per stream, when it was sent and when each chunk
arrived; errors are kept by type rather than raised, so one bad stream never hides the other N-1.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import httpx

from cluster.protogen import ensure_generated
from cluster.request import SamplingParams
from cluster.worker.convert import params_to_pb

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402


@dataclass
class StreamTiming:
    send: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0  # tokens the stream delivered (router: usage.completion_tokens)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


@dataclass
class Gauge:
    """Streams open right now (headers or first message received, not finished) and the peak."""

    now: int = 0
    peak: int = 0

    def up(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def down(self) -> None:
        self.now -= 1


async def run_streams(n: int, one: Callable[[int, StreamTiming, Gauge], Awaitable[None]], timeout: float,
                      on_done: Callable[[], None] = lambda: None) -> tuple[list[StreamTiming], int]:
    """Start n streams together; each gets `timeout` seconds. Returns (timings, peak streams held)."""
    timings, gauge = [StreamTiming() for _ in range(n)], Gauge()

    async def task(i: int) -> None:
        timings[i].send = time.perf_counter()
        try:
            await asyncio.wait_for(one(i, timings[i], gauge), timeout)
        except TimeoutError:
            timings[i].error = "timeout"
        except grpc.aio.AioRpcError as exc:
            timings[i].error = f"grpc_{exc.code().name}"
        except Exception as exc:  # noqa: BLE001 — counted by type, the benchmark goes on
            timings[i].error = type(exc).__name__
        on_done()

    await asyncio.gather(*(task(i) for i in range(n)))
    return timings, gauge.peak


def router_stream(client: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int):
    """One streaming /v1/completions per call; usage is asked for to check every token arrived."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}

    async def one(i: int, timing: StreamTiming, gauge: Gauge) -> None:
        async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
            if response.status_code != 200:
                timing.error = f"http_{response.status_code}"
                return
            gauge.up()
            done = False
            try:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    now = time.perf_counter()
                    event = json.loads(data)
                    if "error" in event:
                        timing.error = f"stream_{event['error'].get('type', 'error')}"
                        return
                    if event.get("usage"):
                        timing.tokens = event["usage"]["completion_tokens"]
                    elif event["choices"] and event["choices"][0]["text"]:
                        timing.chunk_times.append(now)  # text chunks only: the finish chunk carries none
            finally:
                gauge.down()
            if not done or timing.tokens != max_tokens:
                timing.error = "incomplete"

    return one


def direct_stream(prefill: pb_grpc.WorkerStub, decode: pb_grpc.WorkerStub, prompt_ids: list[int], max_tokens: int):
    """The router's disaggregated sequence (Decode expect_kv → Prefill → the decode stream) without
    the router: the baseline its added latency is measured against."""
    sampling = params_to_pb(SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))

    async def one(i: int, timing: StreamTiming, gauge: Gauge) -> None:
        rid = f"direct-{i}"
        call = decode.Decode(pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt_ids, sampling_params=sampling,
                                              transfer_id=rid, expect_kv=True, kv_lease_seconds=30.0))
        first = await call.read()
        gauge.up()
        try:
            if first.kv_destination.targets:
                await prefill.Prefill(pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt_ids,
                                                        sampling_params=sampling, transfer_id=rid,
                                                        kv_destination=first.kv_destination))
                timing.chunk_times.append(time.perf_counter())
                timing.tokens += 1
            while (chunk := await call.read()) is not grpc.aio.EOF:
                if chunk.token_ids:
                    timing.chunk_times.append(time.perf_counter())
                    timing.tokens += len(chunk.token_ids)
        finally:
            gauge.down()
            call.cancel()
        if timing.tokens != max_tokens:
            timing.error = "incomplete"

    return one
