"""The prefix-cache and routing-policy benchmarks run end to end on tiny shapes (real worker processes,
embedded Redis, router processes, the loadtest tool), so `make bench` cannot rot. Structure and
invariants only: every run completes, the prefix-cache counters say what the setup implies."""

from __future__ import annotations

import json

from cluster.router.config import DECODE_POLICIES
from loadtest import prefix_bench, routing_bench


def test_prefix_bench_caches_only_when_caching_is_on(tiny_model_dir, tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "B.md"
    prefix_bench.main(["--model", str(tiny_model_dir), "--cpus", "", "--threads", "1", "--num-requests", "6",
                       "--rate", "4", "--num-prefixes", "2", "--prefix-len", "96", "--input-len", "10",
                       "--output-len", "3", "--num-kv-blocks", "64", "--no-progress", "--json", str(out),
                       "--write", str(md)])
    results = json.loads(out.read_text())
    assert set(results) == {"off", "on"}
    for run in results.values():
        summary = run["summary"]
        assert summary["num_completed"] == 6 and summary["num_failed"] == 0
        assert summary["num_output_tokens"] == 6 * 3  # ignore_eos: every answer as long as asked
    off, on = results["off"], results["on"]
    assert off["prefix_cache_hits"] == 0 and off["prefix_cache_queries"] == 0 and off["hit_rate"] == 0
    # 6 prompts of 106 tokens, 96 shared within each of the 2 groups: later requests of a group find it
    assert on["prefix_cache_queries"] >= 6 * 106
    assert 0 < on["prefix_cache_hits"] <= 4 * 96 and on["hit_rate"] > 0
    text = md.read_text()
    assert "<!-- prefix-cache:begin -->" in text and "| TTFT P50 (ms) |" in text
    assert "--no-prefix-caching" not in text  # the command line is the bench's own, not the workers'


def test_routing_bench_runs_every_policy(tiny_model_dir, tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "B.md"
    routing_bench.main(["--model", str(tiny_model_dir), "--num-workers", "2", "--num-requests", "6", "--rate", "5",
                        "--num-prefixes", "3", "--prefix-len", "64", "--input-len", "8", "--output-len", "3",
                        "--no-progress", "--json", str(out), "--write", str(md)])
    results = json.loads(out.read_text())
    assert list(results) == list(DECODE_POLICIES)
    for policy, run in results.items():
        summary = run["summary"]
        assert summary["num_completed"] == 6 and summary["num_failed"] == 0, policy
        assert len(run["prompt_tokens_per_worker"]) == 2
        assert sum(run["prompt_tokens_per_worker"]) >= 6 * 72  # every prompt looked up on some worker
        assert 0 <= run["hit_rate"] <= 64 / 72
    text = md.read_text()
    assert "<!-- routing-policies:begin -->" in text
    assert all(f"| {policy} |" in text for policy in DECODE_POLICIES)
