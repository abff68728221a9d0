"""Clients for the router-capacity benchmark: N token streams held at once, each timed per token at
almost no CPU cost of the client's own, so the timings show the server and not the client.

`hold` runs N slots. Slot k starts its first stream k/ramp seconds in (a bounded rate of new streams,
not a connection storm), and starts its next stream as soon as one ends, until the deadline; then
every stream still running is cut (a client going away, not an error). Two kinds of stream:

- through the router (`SSEConnection`): one keep-alive HTTP/1.1 connection per slot, spoken by a raw
  asyncio Protocol. Its hot path, one `data_received` per TCP read, only stamps the time, keeps the
  bytes and checks the last seven for the end of the chunked body; status line, chunk framing, SSE
  events and JSON are parsed after the run (`parse_sse`), the arrival time of each event being that
  of the read that carried its last byte.
- straight to the workers (`direct_stream`): the router's own disaggregated gRPC sequence
  (Decode expect_kv → Prefill → the decode stream), the baseline the router's added latency is
  measured against; one arrival time per token.

A stream's errors are kept on its record by type rather than raised, so one bad stream never hides
the other N-1.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from cluster.protogen import ensure_generated
from cluster.request import SamplingParams
from cluster.worker.convert import params_to_pb

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

_CHUNKED_END = b"\r\n0\r\n\r\n"  # the last chunk of a chunked body (SSE data never holds a bare CR LF)


@dataclass
class StreamRecord:
    """One stream as the client saw it; `times` are time.perf_counter() (CLOCK_MONOTONIC, as the
    servers' own clocks)."""

    slot: int
    send: float = 0.0  # just before the request was written
    times: list[float] = field(default_factory=list)  # router: each TCP read; direct: each token
    blocks: list[bytes] = field(default_factory=list)  # router: the bytes of each read
    token_ids: list[int] = field(default_factory=list)  # direct: the tokens, in order
    request_id: str = ""  # direct: what the worker was asked (router: found in the events)
    is_done: bool = False  # the response ended (router) or the stream finished (direct)
    is_cut: bool = False  # still running at the deadline: cut by the client, not an error
    error: str | None = None


@dataclass
class Gauge:
    """Streams held right now (request written, response not finished) and the peak."""

    now: int = 0
    peak: int = 0

    def up(self) -> None:
        self.now += 1
        if self.now > self.peak:
            self.peak = self.now

    def down(self) -> None:
        self.now -= 1


async def hold(num_slots: int, ramp_per_s: float, deadline: float, timeout: float,
               one: Callable[[StreamRecord], Awaitable[None]]) -> list[StreamRecord]:
    """Run `num_slots` slots until `deadline` (perf_counter); returns every stream started, in order."""
    records: list[StreamRecord] = []

    async def slot(k: int) -> None:
        await asyncio.sleep(k / ramp_per_s)
        while time.perf_counter() < deadline:
            record = StreamRecord(slot=k)
            records.append(record)
            try:
                # asyncio.timeout, not wait_for: the stream runs in this task at once, so a slot goes
                # from one stream to the next without a loop iteration in between (held stays N).
                async with asyncio.timeout(timeout):
                    await one(record)
            except asyncio.CancelledError:
                record.is_cut = True
                raise
            except TimeoutError:
                record.error = "timeout"
            except grpc.aio.AioRpcError as exc:
                record.error = f"grpc_{exc.code().name}"
            except Exception as exc:  # noqa: BLE001 — counted by type, the benchmark goes on
                record.error = type(exc).__name__
            if record.error is not None:
                await asyncio.sleep(0.05)  # a failing server is not hammered by a tight retry loop

    tasks = [asyncio.create_task(slot(k)) for k in range(num_slots)]
    await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return records


# ---- through the router: raw HTTP/1.1 ----
class SSEConnection(asyncio.Protocol):
    """One keep-alive connection carrying one streaming response at a time."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.transport: asyncio.Transport | None = None
        self.is_closed = False
        self._record: StreamRecord | None = None
        self._done: asyncio.Future | None = None
        self._head = b""  # response bytes until the headers are complete
        self._remaining = -1  # body bytes still due (Content-Length responses); -1: chunked
        self._tail = b""  # the last bytes read: the end marker may straddle two reads

    @classmethod
    async def open(cls, host: str, port: int, gauge: Gauge) -> SSEConnection:
        _, conn = await asyncio.get_running_loop().create_connection(lambda: cls(gauge), host, port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    async def request(self, data: bytes, record: StreamRecord) -> None:
        """Write one request; returns once its whole response is in `record`."""
        self._record, self._head, self._remaining, self._tail = record, b"", -1, b""
        self._done = asyncio.get_running_loop().create_future()
        record.send = time.perf_counter()
        self.transport.write(data)
        self.gauge.up()
        try:
            await self._done
        except asyncio.CancelledError:
            self.close()  # the server sees a client that went away
            raise
        finally:
            self.gauge.down()
            self._record = self._done = None

    def data_received(self, data: bytes) -> None:
        record = self._record
        if record is None:
            return
        record.times.append(time.perf_counter())
        record.blocks.append(data)
        if self._head is not None:  # still in the headers: once per response, not per token
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[:end].lower(), self._head[end + 4:]
            self._head = None
            if b"transfer-encoding: chunked" not in head:  # an error answer: a body of known length
                length = head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0] if b"content-length:" in head else b"0"
                self._remaining = int(length)
        if self._remaining >= 0:
            self._remaining -= len(data)
            if self._remaining <= 0:
                self._finish()
            return
        probe = self._tail + data[-7:]
        if probe.endswith(_CHUNKED_END):
            self._finish()
        else:
            self._tail = probe[-6:]

    def _finish(self) -> None:
        self._record.is_done = True
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        self._record = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionResetError("connection closed mid-response"))

    def close(self) -> None:
        if self.transport is not None and not self.is_closed:
            self.transport.close()


def completion_request(host: str, model: str, prompt: str, max_tokens: int) -> bytes:
    """A streaming /v1/completions request, bytes ready to write (the same for every stream)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"accept: text/event-stream\r\ncontent-length: {len(body)}\r\n\r\n")
    return head.encode() + body


def router_stream(address: str, request: bytes, gauge: Gauge, num_slots: int):
    """One stream per call on the slot's own keep-alive connection (reopened if the server closed it)."""
    host, port = address.rsplit(":", 1)
    conns: list[SSEConnection | None] = [None] * num_slots

    async def one(record: StreamRecord) -> None:
        conn = conns[record.slot]
        if conn is None or conn.is_closed:
            conn = conns[record.slot] = await SSEConnection.open(host, int(port), gauge)
        await conn.request(request, record)

    def close_all() -> None:
        for conn in conns:
            if conn is not None:
                conn.close()

    return one, close_all


@dataclass
class SSEResponse:
    status: int
    events: list[tuple[float, bytes]]  # (arrival time, the event's data field)
    body: bytes = b""  # a non-streaming (error) response's body


def parse_sse(record: StreamRecord) -> SSEResponse:
    """The response in `record.blocks`, parsed after the run; a cut stream yields its complete events."""
    raw = b"".join(record.blocks)
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0 or not raw.startswith(b"HTTP/1.1 "):
        return SSEResponse(0, [])
    status, head, pos = int(raw[9:12]), raw[:head_end].lower(), head_end + 4
    if b"transfer-encoding: chunked" not in head:
        return SSEResponse(status, [], raw[pos:])
    ends = list(itertools.accumulate(len(b) for b in record.blocks))
    events, pending = [], b""
    while (eol := raw.find(b"\r\n", pos)) >= 0:
        size = int(raw[pos:eol], 16)
        start, end = eol + 2, eol + 2 + size
        if size == 0 or end > len(raw):
            break
        arrival = record.times[bisect.bisect_right(ends, end - 1)]  # the read with the chunk's last byte
        pending += raw[start:end]
        while (cut := pending.find(b"\n\n")) >= 0:
            event, pending = pending[:cut], pending[cut + 2:]
            if event.startswith(b"data: "):
                events.append((arrival, event[6:]))
        pos = end + 2
    return SSEResponse(status, events)


# ---- straight to the workers: gRPC ----
def direct_stream(prefill: pb_grpc.WorkerStub, decode: pb_grpc.WorkerStub, prompt_ids: list[int], max_tokens: int,
                  gauge: Gauge):
    """The router's disaggregated sequence without the router: the baseline."""
    sampling = params_to_pb(SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    numbers = itertools.count()

    async def one(record: StreamRecord) -> None:
        rid = record.request_id = f"direct-{record.slot}-{next(numbers)}"
        record.send = time.perf_counter()
        call = decode.Decode(pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt_ids, sampling_params=sampling,
                                              transfer_id=rid, expect_kv=True, kv_lease_seconds=30.0))
        gauge.up()
        try:
            first = await call.read()
            if first.kv_destination.targets:
                response = await prefill.Prefill(pb.PrefillRequest(
                    request_id=rid, prompt_token_ids=prompt_ids, sampling_params=sampling, transfer_id=rid,
                    kv_destination=first.kv_destination))
                record.times.append(time.perf_counter())
                record.token_ids.append(response.first_token_id)
            while (chunk := await call.read()) is not grpc.aio.EOF:
                if chunk.token_ids:
                    now = time.perf_counter()
                    record.times.extend([now] * len(chunk.token_ids))
                    record.token_ids.extend(chunk.token_ids)
            record.is_done = True
        finally:
            gauge.down()
            call.cancel()

    return one
