"""The offline benchmark script runs end to end on tiny shapes, so `make bench` cannot rot."""

from __future__ import annotations

import json

from loadtest import offline_bench


def test_offline_bench_runs_and_writes_its_section(tiny_model_dir, tmp_path):
    results, md = tmp_path / "r.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\nkept text\n")
    offline_bench.main([
        "--model", str(tiny_model_dir), "--num-prompts", "3", "--input-len", "8", "--output-len", "5",
        "--hf-batch-size", "2", "--json", str(results), "--write", str(md),
    ])
    figures = json.loads(results.read_text())
    assert figures["engine"]["output_tokens"] == 15 == figures["transformers"]["output_tokens"]
    text = md.read_text()
    assert "kept text" in text and "pdserve engine" in text
    offline_bench.main(["--model", str(tiny_model_dir), "--num-prompts", "2", "--input-len", "4", "--output-len",
                        "2", "--skip-transformers", "--write", str(md)])
    assert md.read_text().count("pdserve engine") == 1  # the section is replaced, not appended
