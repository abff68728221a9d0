"""The command line: make-model writes a checkpoint the engine loads; generate runs a JSONL file."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main


def test_make_model_then_generate_over_jsonl(tmp_path, capsys):
    model = tmp_path / "m"
    assert main(["make-model", "--preset", "tiny-llama-gqa", str(model)]) == 0
    assert (model / "model.safetensors").exists() and (model / "tokenizer.json").exists()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n\n{"prompt_token_ids": [5, 6, 7]}\n')
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--model", str(model), "--input", str(prompts), "--output", str(out),
                 "--max-tokens", "5", "--kv-cache-memory-gib", "0.05"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    assert rows[0]["prompt"] == "hello" and rows[1]["prompt"] is None
    assert all(1 <= len(r["token_ids"]) <= 5 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert "2 prompts" in capsys.readouterr().err


def test_generate_rejects_a_line_without_a_prompt(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="prompt"):
        main(["generate", "--model", str(tiny_model_dir), "--input", str(prompts)])


@pytest.mark.parametrize("flags", [[], ["--unified"]], ids=["disaggregated", "unified"])
def test_up_serves_a_chat_request_through_the_router(tmp_path, flags):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = tmp_path / "tiny"
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "up", "--once", "--model", str(model),
                           "--port", str(port), "--kv-cache-memory-gib", "0.05", *flags], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    response = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert response["object"] == "chat.completion" and response["model"] == "tiny"
    assert response["usage"]["completion_tokens"] >= 1 and response["choices"][0]["message"]["role"] == "assistant"
    assert (model / "config.json").exists()  # it made the tiny model itself


def test_up_serves_until_sigterm_and_leaves_no_process_behind(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx
    import openai
    import psutil

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    port, grpc_port = ports
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "--model", str(tmp_path / "tiny"),
                             "--port", str(port), "--grpc-port", str(grpc_port), "--kv-cache-memory-gib", "0.05"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "pdserve up exited before it was ready"
            time.sleep(0.5)
        chat = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=5)
        assert chat.choices[0].message.content is not None and chat.usage.completion_tokens >= 1
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        started = psutil.Process(proc.pid).children(recursive=True)
        assert started, "Ray and the workers run as child processes"
        _check_metrics_and_status(base, tmp_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"left behind: {[p.pid for p in alive]}"


def _check_metrics_and_status(base: str, run_dir_parent) -> None:
    """After a request: /metrics has the router's counts and each worker's figures (from the load
    reports the workers publish to Redis); `pdserve status`, run where `pdserve up` was, lists both pools."""
    import subprocess
    import sys
    import time

    import httpx

    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{base}/metrics", timeout=5).text
        if 'pdserve:pool_replicas{model="tiny",pool="decode"} 1.0' in text and "pool=\"prefill\"" in text:
            break
        time.sleep(0.5)
    assert 'pdserve:pool_replicas{model="tiny",pool="decode"} 1.0' in text, text[-3000:]
    assert 'pdserve:pool_replicas{model="tiny",pool="prefill"} 1.0' in text
    assert 'pdserve:requests_total{model="tiny",status=' in text
    assert "pdserve:time_to_first_token_seconds_count" in text
    status = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--json"], cwd=run_dir_parent,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr[-2000:]
    import json

    models = json.loads(status.stdout)["models"]
    pools = {p["pool"]: p["num_workers"] for m in models if m["model"] == "tiny" for p in m["pools"]}
    assert pools.get("prefill") == 1 and pools.get("decode") == 1, pools

    # The router records what the autoscaler reads: arrivals and TTFT samples, in the same Redis.
    from cluster.autoscale.traffic import read_traffic
    from cluster.state import StateStore

    up = json.loads((run_dir_parent / ".pdserve" / "up.json").read_text())
    store = StateStore.from_url(up["redis_url"])
    try:
        deadline = time.monotonic() + 60  # flushed with each discovery poll, retried after a Redis hiccup
        while True:
            traffic = read_traffic(store, "tiny", window_s=290)
            if (traffic.arrival_rate and traffic.ttft_p95_s is not None) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        store.close()
    assert traffic.arrival_rate and traffic.arrival_rate > 0 and traffic.ttft_p95_s is not None, traffic
