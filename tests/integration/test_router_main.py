"""`python -m cluster.router` (the chart's router Deployment) as a real process against a real embedded
Redis: it starts with no worker, finds the simulated prefill and decode workers registered there,
serves a chat completion over HTTP and the model list over gRPC, refuses a config naming no Redis or
no checkpoint (exit 2, naming the field), and exits 0 on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

from cluster.protogen import ensure_generated
from cluster.state import StateStore, WorkerInfo, start_embedded_redis
from loadtest.workers import start_cli_worker

ensure_generated()
from pdserve.v1 import serving_pb2 as spb  # noqa: E402
from pdserve.v1 import serving_pb2_grpc as spb_grpc  # noqa: E402

MODEL = "tiny-k8s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    server = start_embedded_redis(tmp_path_factory.mktemp("router-main-redis"))
    yield server.url
    server.close()


def write_config(path: Path, model_dir: Path, **top) -> Path:
    path.write_text(yaml.safe_dump({"models": [{"path": str(model_dir), "name": MODEL}],
                                    "router": {"poll_interval_s": 0.1}, **top}))
    return path


def run_router(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cluster.router", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_ready_line(proc: subprocess.Popen, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line.startswith("READY "):
            return line
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"router did not start (rc={proc.poll()})")


def test_router_process_serves_workers_found_in_redis(tmp_path, tiny_model_dir, redis_url):
    http_port, grpc_port = free_port(), free_port()
    config = write_config(tmp_path / "cluster.yaml", tiny_model_dir)
    workers = [start_cli_worker(["--role", "simulated", "--vocab-size", "2048", "--ttft-ms", "5", "--itl-ms", "5"],
                                timeout=60) for _ in range(2)]
    store = StateStore.from_url(redis_url)
    proc = run_router(["--config", str(config), "--redis-url", redis_url, "--host", "127.0.0.1",
                       "--port", str(http_port), "--grpc-port", str(grpc_port)])
    try:
        assert f"grpc=127.0.0.1:{grpc_port}" in wait_ready_line(proc)
        base = f"http://127.0.0.1:{http_port}"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                "ignore_eos": True}
        # No worker has registered yet: the router is up but cannot serve the model.
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30).status_code == 503

        for role, w in zip(("prefill", "decode"), workers, strict=True):
            store.register(WorkerInfo(f"k8s-{role}-0", MODEL, role, w.address), ttl_s=60)
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/ready", timeout=10).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        out = response.json()
        assert out["model"] == MODEL
        assert out["usage"]["completion_tokens"] == 6

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            models = spb_grpc.ServingStub(channel).Models(spb.ModelsRequest(), timeout=10)
        assert [(m.id, m.ready) for m in models.models] == [(MODEL, True)]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        store.r.flushdb()
        store.close()
        for w in workers:
            w.stop()


def test_router_process_refuses_bad_configs(tmp_path, tiny_model_dir, redis_url):
    no_redis = run_router(["--config", str(write_config(tmp_path / "a.yaml", tiny_model_dir))])
    assert no_redis.wait(timeout=60) == 2
    assert "redis" in no_redis.stderr.read().lower()

    missing = write_config(tmp_path / "b.yaml", tmp_path / "no-such-model")
    no_model = run_router(["--config", str(missing), "--redis-url", redis_url])
    assert no_model.wait(timeout=60) == 2
    assert "models[0].path" in no_model.stderr.read()

    bad = tmp_path / "c.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"path": str(tiny_model_dir), "decode_tp": 0}]}))
    invalid = run_router(["--config", str(bad), "--redis-url", redis_url])
    assert invalid.wait(timeout=60) == 2
    assert "decode_tp" in invalid.stderr.read()


def test_api_keys_file_adds_keys_the_router_checks(tmp_path, tiny_model_dir, redis_url):
    """The chart mounts its API-key Secret as a file: the keys in it are the ones the router accepts."""
    http_port, grpc_port = free_port(), free_port()
    keys = tmp_path / "keys"
    keys.write_text("# one key a line\nsk-alpha\n\nsk-beta\n")
    config = write_config(tmp_path / "cluster.yaml", tiny_model_dir)
    proc = run_router(["--config", str(config), "--redis-url", redis_url, "--api-keys-file", str(keys),
                       "--host", "127.0.0.1", "--port", str(http_port), "--grpc-port", str(grpc_port)])
    try:
        wait_ready_line(proc)
        url = f"http://127.0.0.1:{http_port}/v1/models"
        assert httpx.get(url, timeout=10).status_code == 401
        assert httpx.get(url, headers={"authorization": "Bearer sk-gamma"}, timeout=10).status_code == 401
        for key in ("sk-alpha", "sk-beta"):
            assert httpx.get(url, headers={"authorization": f"Bearer {key}"}, timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    keys.write_text("sk-alpha\nsk-alpha\n")
    twice = run_router(["--config", str(config), "--redis-url", redis_url, "--api-keys-file", str(keys)])
    assert twice.wait(timeout=60) == 2
    assert "router.auth.api_keys" in twice.stderr.read()
