"""The disaggregated-vs-unified benchmark runs end to end on tiny shapes, so `make bench` cannot rot."""

from __future__ import annotations

import json

from loadtest import disagg_bench


def test_disagg_bench_completes_every_request(tiny_model_dir, tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "B.md"
    disagg_bench.main(["--model", str(tiny_model_dir), "--num-requests", "5", "--rate", "10",
                       "--input-len", "12", "--output-len", "4", "--long-input-len", "80",
                       "--long-output-len", "3", "--json", str(out), "--write", str(md)])
    results = json.loads(out.read_text())
    for system in ("disaggregated", "unified"):
        assert results[system]["completed"] == 5 and results[system]["errors"] == 0
        assert results[system]["ttft_p50"] > 0 and results[system]["output_tok_s"] > 0
    assert "| ITL P99 (ms) |" in md.read_text()
