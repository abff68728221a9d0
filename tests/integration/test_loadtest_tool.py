"""The serving benchmark (`python -m loadtest`, `pdserve bench`) end to end.

Against the synthetic server (loadtest/synthetic_server.py: token i written ttft + i·itl after the
request arrived, usage counted, every n-th request refused with 429), each figure the tool computes
is checked against those known timings. Timing checks are lower bounds the server guarantees plus a
generous upper slack (the machine is shared and noisy); counts are exact. Then: a sweep writes its
plots, `--compare` prints two result files side by side, and a run against the real router over a
simulated worker, through the HTTP and the gRPC API, sends exact token-id prompts.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from cluster.cli import main as pdserve
from cluster.model.tokenizer import Tokenizer
from cluster.router.dispatch import ModelPool
from cluster.router.grpc_api import serve_grpc
from cluster.router.http import create_app
from loadtest.arrival import Arrival
from loadtest.bench_cli import main as bench
from loadtest.synthetic_server import token_text
from loadtest.workers import start_cli_worker

SLACK = 3.0  # seconds a loaded machine may add to any latency


class Synthetic:
    """A synthetic server process (its own process: in a thread it would share the client's GIL)."""

    def __init__(self, *flags: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "loadtest.synthetic_server", *flags],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("READY "), "the synthetic server did not start"
        self.url = f"http://{line.split()[1]}"

    @property
    def requests(self) -> list[dict]:
        return httpx.get(f"{self.url}/synthetic/requests").json()["requests"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def synthetic():
    """synthetic(ttft_s, itl_s, *flags) -> a started server."""
    servers = []

    def start(ttft_s: float, itl_s: float, *flags: str) -> Synthetic:
        servers.append(Synthetic("--ttft-ms", str(ttft_s * 1e3), "--itl-ms", str(itl_s * 1e3), *flags))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def run_bench(tmp_path: Path, name: str, *flags: str, rc: int = 0) -> dict:
    path = tmp_path / f"{name}.json"
    assert bench([*flags, "--no-progress", "--result", str(path)]) == rc
    return json.loads(path.read_text())


def ok_records(doc: dict, run: int = 0) -> list[dict]:
    return [r for r in doc["runs"][run]["records"] if r["error"] is None and not r["is_cut"]]


def test_every_figure_against_a_server_with_known_timings(tmp_path, synthetic):
    ttft, itl, n_out = 0.1, 0.02, 8
    server = synthetic(ttft, itl, "--fail-every", "5")
    doc = run_bench(tmp_path, "known", "--base-url", server.url, "--input-len", "16", "--output-len", str(n_out),
                    "--rate", "40", "--num-requests", "20", "--seed", "3", "--slo", "ttft=5,tpot=1",
                    "--api-key", "sk-test-secret")
    summary, records = doc["runs"][0]["summary"], doc["runs"][0]["records"]
    done = ok_records(doc)
    # Counts are exact: every 5th request refused.
    assert (summary["num_requests"], summary["num_completed"], summary["num_cut"]) == (20, 16, 0)
    assert summary["errors_by_type"] == {"http_429": 4}
    # The key went to the server on every request and nowhere into the file.
    assert {r["authorization"] for r in server.requests} == {"Bearer sk-test-secret"}
    assert "sk-test-secret" not in (tmp_path / "known.json").read_text()
    # Requests went out on the seeded Poisson schedule, never early.
    expected = Arrival("poisson", rate=40.0).times(np.random.default_rng(3), 20)
    assert [r["scheduled"] for r in records] == pytest.approx(expected)
    assert all(r["start"] >= r["scheduled"] for r in records)
    # Tokens: the server's usage counts (no tokenizer: words).
    assert all(r["num_output_tokens"] == n_out and r["output_tokens_from"] == "usage" for r in done)
    assert all(r["num_input_tokens"] == 16 for r in done)
    assert all(len(r["chunk_times"]) == n_out for r in done)
    assert (summary["num_input_tokens"], summary["num_output_tokens"]) == (16 * 16, 16 * n_out)
    # Latencies against the schedule: token i is written ttft + i·itl after the request arrived, so it
    # cannot be read earlier (a loaded machine may only make it later).
    for r in done:
        for i, arrival in enumerate(r["chunk_times"]):
            assert ttft + i * itl <= arrival <= ttft + i * itl + SLACK
        assert r["ttft"] == r["chunk_times"][0]
        assert r["chunk_times"][-1] <= r["end"] <= ttft + (n_out - 1) * itl + SLACK
        assert r["tpot"] == pytest.approx((r["end"] - r["ttft"]) / (n_out - 1))
        assert 0 <= r["tpot"] <= itl + SLACK
    gaps = [b - a for r in done for a, b in zip(r["chunk_times"], r["chunk_times"][1:], strict=False)]
    assert len(gaps) == 16 * (n_out - 1) and 0 <= min(gaps) and max(gaps) <= itl + SLACK
    # The summary is exactly what the file's own records give.
    for name, values in [("ttft", [r["ttft"] for r in done]), ("e2e", [r["end"] for r in done]),
                         ("tpot", [r["tpot"] for r in done]), ("itl", gaps)]:
        assert summary[name]["n"] == len(values)
        assert summary[name]["mean"] == pytest.approx(np.mean(values))
        for p in (50, 90, 95, 99):
            assert summary[name][f"p{p}"] == pytest.approx(np.percentile(values, p))
    duration = summary["duration_s"]
    assert duration >= max(r["start"] + r["end"] for r in done)
    assert summary["request_throughput"] == pytest.approx(16 / duration)
    assert summary["output_throughput"] == pytest.approx(16 * n_out / duration)
    assert summary["total_token_throughput"] == pytest.approx(16 * (16 + n_out) / duration)
    assert summary["goodput"]["num_good"] == 16 and summary["goodput"]["requests_per_s"] == pytest.approx(16 / duration)
    assert doc["config"]["rate"] == 40.0 and doc["machine"]["num_cpus"] >= 1 and doc["date"]


def test_chat_with_shared_prefixes_closed_loop_and_several_tokens_a_chunk(tmp_path, synthetic):
    ttft, itl = 0.05, 0.01
    server = synthetic(ttft, itl, "--tokens-per-chunk", "2")
    doc = run_bench(tmp_path, "chat", "--base-url", server.url, "--backend", "openai-chat", "--workload", "shared-prefix",
                    "--num-prefixes", "2", "--prefix-len", "50", "--input-len", "10", "--output-len", "6",
                    "--concurrency", "3", "--num-requests", "8", "--model", "synthetic")
    received = server.requests
    assert all(r["path"] == "/v1/chat/completions" for r in received)
    systems = {r["body"]["messages"][0]["content"] for r in received}
    assert len(systems) == 2 and all(len(s.split()) == 50 for s in systems)
    done = ok_records(doc)
    assert len(done) == 8
    for r in done:
        # The role chunk the server sent at once is not a token: the first chunk holds tokens 0 and 1,
        # chunk j tokens 2j and 2j+1, written when token 2j+1 is due.
        assert len(r["chunk_times"]) == 3 and r["num_output_tokens"] == 6 and r["output_tokens_from"] == "usage"
        for j, arrival in enumerate(r["chunk_times"]):
            assert ttft + (2 * j + 1) * itl <= arrival <= ttft + (2 * j + 1) * itl + SLACK
        assert r["tpot"] == pytest.approx((r["end"] - r["ttft"]) / 5)  # over tokens, not chunks
        assert r["num_input_tokens"] == 60
    summary = doc["runs"][0]["summary"]
    assert summary["itl"]["n"] == 8 * 2  # gaps between chunks
    assert 1 <= summary["peak_concurrency"] <= 3  # three users, closed loop


def test_multi_turn_sessions_resend_their_real_history(tmp_path, synthetic):
    server = synthetic(0.01, 0.005)
    run_bench(tmp_path, "turns", "--base-url", server.url, "--backend", "openai-chat", "--workload", "multi-turn",
              "--num-turns", "3", "--num-sessions", "2", "--input-len", "5", "--output-len", "4",
              "--concurrency", "2", "--num-requests", "6")
    answer = "".join(token_text(i) for i in range(4))
    conversations = [r["body"]["messages"] for r in server.requests]
    assert sorted(len(m) for m in conversations) == [1, 1, 3, 3, 5, 5]
    for messages in conversations:
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + ["user"]
        assert all(m["content"] == answer for m in messages if m["role"] == "assistant")
    # Each later turn starts with the earlier turn's whole conversation.
    for later in (m for m in conversations if len(m) > 1):
        assert any(later[:len(earlier)] == earlier for earlier in conversations if len(earlier) == len(later) - 2)


def test_runs_are_bounded_by_duration_and_cut_after_the_grace(tmp_path, synthetic):
    doc = run_bench(tmp_path, "short", "--base-url", synthetic(0.01, 0.005).url, "--output-len", "2", "--rate", "20",
                    "--arrival", "constant", "--num-requests", "1000", "--duration", "0.5")
    records = doc["runs"][0]["records"]
    assert 1 <= len(records) <= 10 and all(r["scheduled"] < 0.5 for r in records)  # constant 20/s for 0.5 s
    doc = run_bench(tmp_path, "cut", "--base-url", synthetic(0.01, 1.0).url, "--output-len", "50", "--concurrency", "2",
                    "--duration", "0.3", "--grace", "0.2", "--num-requests", "10", rc=1)  # nothing completed
    summary = doc["runs"][0]["summary"]
    assert summary["num_cut"] == summary["num_requests"] == 2 and summary["num_failed"] == 0


def test_text_only_servers_get_text_prompts_and_unreachable_ones_a_clear_error(tmp_path, synthetic, tiny_model_dir,
                                                                              capsys):
    server = synthetic(0.0, 0.0, "--text-only", "--no-usage")
    doc = run_bench(tmp_path, "text", "--base-url", server.url, "--tokenizer", str(tiny_model_dir), "--input-len", "12",
                    "--output-len", "3", "--num-requests", "3")
    assert doc["config"]["use_token_ids"] is False
    received = server.requests
    assert isinstance(received[0]["body"]["prompt"], list)  # the one probe
    assert len(received) == 4 and all(isinstance(r["body"]["prompt"], str) for r in received[1:])
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    assert all(len(tokenizer.encode(r["body"]["prompt"], add_special_tokens=False)) == 12 for r in received[1:])
    # No usage from this server: tokens counted a chunk each.
    assert all(r["output_tokens_from"] == "chunks" and r["num_output_tokens"] == 3 for r in ok_records(doc))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    down = tmp_path / "down.json"
    assert bench(["--base-url", f"http://127.0.0.1:{free}", "--model", "m", "--result", str(down), "--no-progress",
                  "--num-requests", "2"]) == 1  # nothing completed
    assert json.loads(down.read_text())["runs"][0]["summary"]["errors_by_type"] == {"connect_error": 2}
    capsys.readouterr()
    assert bench(["--base-url", f"http://127.0.0.1:{free}", "--no-result", "--no-progress"]) == 2  # no model to ask
    assert "connect_error" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        bench(["--rate", "0"])
    assert exc.value.code == 2 and "rate must be > 0" in capsys.readouterr().err


def test_sweep_writes_plots_and_compare_prints_both_files(tmp_path, synthetic, capsys):
    fast, slow = synthetic(0.02, 0.005), synthetic(0.08, 0.01).url
    flags = ["--output-len", "4", "--input-len", "8", "--num-requests", "6", "--sweep", "rate=20,40",
             "--slo", "ttft=0.05"]
    a = run_bench(tmp_path, "a", "--base-url", fast.url, *flags, "--warmup", "1", "--plot-dir", str(tmp_path / "plots"))
    b = run_bench(tmp_path, "b", "--base-url", slow, *flags)
    # The warmup and each point send prompts of their own: none a prefix cache has seen.
    prompts = [r["body"]["prompt"] for r in fast.requests]
    assert len(prompts) == 1 + 2 * 6 and len(set(prompts)) == len(prompts)
    assert [r["label"] for r in a["runs"]] == ["rate=20", "rate=40"] and a["sweep"]["param"] == "rate"
    assert [r["params"] for r in a["runs"]] == [{"rate": 20.0}, {"rate": 40.0}]
    for name in ("latency_cdf.png", "sweep.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert pdserve(["bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("== rate=") == 2
    block = out.split("== rate=40 ==")[1]
    row = next(line for line in block.splitlines() if line.startswith("TTFT P50 (ms)")).split()
    ttft_a, ttft_b = a["runs"][1]["summary"]["ttft"]["p50"], b["runs"][1]["summary"]["ttft"]["p50"]
    assert row[-3:] == [f"{ttft_a * 1e3:.2f}", f"{ttft_b * 1e3:.2f}", f"{ttft_b / ttft_a:.2f}x"]
    assert ttft_a >= 0.02 and ttft_b >= 0.08  # each server's TTFT is a floor (not compared: the machine is noisy)


@pytest.fixture(scope="module")
def router(tiny_model_dir):
    """(HTTP base URL, gRPC address) of a router over one simulated worker, both APIs on one loop."""
    worker = start_cli_worker(["--role", "simulated", "--vocab-size", "2048", "--ttft-ms", "30", "--itl-ms", "10"],
                              timeout=60)
    pool = ModelPool("tiny", Tokenizer.from_dir(tiny_model_dir), max_model_len=2048, unified=[worker.address])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    grpc_server, grpc_port = asyncio.run_coroutine_threadsafe(serve_grpc({"tiny": pool}, "127.0.0.1", 0), loop).result(30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    http = uvicorn.Server(uvicorn.Config(create_app({"tiny": pool}), host="127.0.0.1", port=http_port,
                                         log_level="warning"))
    http_done = asyncio.run_coroutine_threadsafe(http.serve(), loop)
    deadline = time.monotonic() + 30
    while not http.started:
        assert time.monotonic() < deadline, "the router did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    finally:
        asyncio.run_coroutine_threadsafe(grpc_server.stop(1), loop).result(10)
        http.should_exit = True
        http_done.result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        worker.stop()


@pytest.mark.parametrize("backend", ["openai", "grpc"])
def test_the_real_router_over_a_simulated_worker(tmp_path, router, tiny_model_dir, backend):
    base_url, grpc_target = router
    doc = run_bench(tmp_path, backend, "--backend", backend, "--base-url", base_url, "--grpc-target", grpc_target,
                    "--tokenizer", str(tiny_model_dir), "--input-len", "uniform:10:40", "--output-len", "6",
                    "--rate", "50", "--num-requests", "8", "--warmup", "1")
    assert doc["config"]["model"] == "tiny" and doc["config"]["use_token_ids"] is True  # listed, then probed
    done = ok_records(doc)
    assert len(done) == 8
    for r in done:
        # Token-id prompts: the router's own count is exactly what was built.
        assert r["num_input_tokens"] == r["num_expected_input_tokens"] and 10 <= r["num_input_tokens"] <= 40
        assert r["num_output_tokens"] == 6 and r["output_tokens_from"] == "usage"
        assert 0.03 <= r["ttft"] <= 0.03 + SLACK and r["end"] >= 0.03 + 5 * 0.01
        if backend == "grpc":
            assert sum(r["chunk_tokens"]) == 6
