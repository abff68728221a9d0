"""A client that goes away aborts its request on every worker it touched: long greedy requests through
the router to real prefill and decode worker processes are cut off by the client (an SSE stream closed
after a few chunks, a non-streamed request's socket closed while it runs, a gRPC call cancelled), and
then both workers' Stats show nothing running, waiting or waiting for KV, and every KV block free; the
router counts each as aborted, not finished."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import grpc
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from cluster.model.tokenizer import Tokenizer
from cluster.protogen import ensure_generated
from cluster.router.dispatch import ModelPool
from cluster.router.grpc_api import serve_grpc
from cluster.router.http import create_app
from loadtest.workers import start_worker

ensure_generated()
from pdserve.v1 import serving_pb2 as spb  # noqa: E402
from pdserve.v1 import serving_pb2_grpc as spb_grpc  # noqa: E402
from pdserve.v1 import worker_pb2 as wpb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as wpb_grpc  # noqa: E402

MODEL = "tiny"
# Long enough (~10 s on this machine) that only an abort can end it within the test's first seconds.
MAX_TOKENS = 1900


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    """(HTTP host, HTTP port, gRPC address, worker addresses)."""
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
        port = s.getsockname()[1]
    http = uvicorn.Server(uvicorn.Config(create_app({MODEL: pool}), host="127.0.0.1", port=port, log_level="warning"))
    http_done = asyncio.run_coroutine_threadsafe(http.serve(), loop)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not http.started:
        time.sleep(0.05)
    yield "127.0.0.1", port, f"127.0.0.1:{grpc_port}", [w.address for w in workers]
    asyncio.run_coroutine_threadsafe(server.stop(1), loop).result(10)
    http.should_exit = True
    http_done.result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    for w in workers:
        w.stop()


def stats(address: str) -> wpb.StatsResponse:
    with grpc.insecure_channel(address) as ch:
        return wpb_grpc.WorkerStub(ch).Stats(wpb.StatsRequest(), timeout=10)


def is_idle(s: wpb.StatsResponse) -> bool:
    return (s.num_requests_running, s.num_requests_waiting, s.num_requests_waiting_for_kv) == (0, 0, 0) and \
        s.num_free_blocks == s.num_total_blocks


def wait_until(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def outcomes(host: str, port: int) -> dict[str, float]:
    with socket.create_connection((host, port)) as s:
        s.sendall(f"GET /metrics HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    text = raw.split(b"\r\n\r\n", 1)[1].decode()
    return {s.labels["status"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "pdserve:requests_total" and s.labels.get("model") == MODEL}


def open_request(host: str, port: int, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection((host, port))
    s.sendall(f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
              f"content-length: {len(data)}\r\n\r\n".encode() + data)
    return s


def assert_aborted_everywhere(cluster, before: dict[str, float]) -> None:
    host, port, _, workers = cluster
    assert wait_until(lambda: all(is_idle(stats(w)) for w in workers)), [stats(w) for w in workers]
    assert wait_until(lambda: outcomes(host, port).get("abort", 0) == before.get("abort", 0) + 1)
    assert outcomes(host, port).get("length", 0) == before.get("length", 0)  # none ran to its end


BODY = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


def test_closing_an_sse_stream_aborts_on_both_workers(cluster):
    host, port, _, (_, decode) = cluster
    before = outcomes(host, port)
    s = open_request(host, port, "/v1/completions", {**BODY, "stream": True})
    received = b""
    while received.count(b"data: ") < 4:  # the first few chunks: the request is being decoded
        received += s.recv(4096)
    assert b"200 OK" in received.split(b"\r\n", 1)[0]
    assert stats(decode).num_requests_running == 1
    s.close()
    assert_aborted_everywhere(cluster, before)


def test_closing_while_a_non_streamed_request_runs_aborts_it(cluster):
    host, port, _, (_, decode) = cluster
    before = outcomes(host, port)
    s = open_request(host, port, "/v1/chat/completions",
                     {**{k: v for k, v in BODY.items() if k != "prompt"},
                      "messages": [{"role": "user", "content": "Once upon a time"}]})
    assert wait_until(lambda: stats(decode).num_requests_running == 1)
    s.close()
    assert_aborted_everywhere(cluster, before)


def test_cancelling_a_grpc_call_aborts_on_both_workers(cluster):
    host, port, address, (_, decode) = cluster
    before = outcomes(host, port)
    with grpc.insecure_channel(address) as ch:
        call = spb_grpc.ServingStub(ch).Generate(spb.GenerateRequest(
            model=MODEL, prompt="Once upon a time",
            sampling=spb.GenerateSampling(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)))
        for _ in range(3):
            next(call)
        assert stats(decode).num_requests_running == 1
        call.cancel()
    assert_aborted_everywhere(cluster, before)
