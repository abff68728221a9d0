"""The transfer benchmarks run end to end on tiny shapes, so `make bench` cannot rot."""

from __future__ import annotations

import json

from loadtest import transfer_bench, transfer_overlap


def test_transfer_bench_measures_every_path(tmp_path):
    md = tmp_path / "B.md"
    rows = transfer_bench.main(["--tokens", "64", "--layers", "2", "--kv-heads", "2", "--head-dim", "16",
                                "--reps", "1", "--rounds", "1", "--write", str(md)])
    assert [name for name, _, _ in rows] == ["memcpy (torch copy_)", "gloo send/recv (raw)", "local transport",
                                            "grpc transport", "dist transport"]
    assert all(ms > 0 and gbs > 0 for _, ms, gbs in rows)
    assert "| dist transport |" in md.read_text()


def test_transfer_overlap_reports_a_fraction(tiny_model_dir, tmp_path):
    out = tmp_path / "o.json"
    transfer_overlap.main(["--model", str(tiny_model_dir), "--prompt-len", "64", "--repeats", "1",
                           "--json", str(out)])
    result = json.loads(out.read_text())
    assert 0.0 <= result["hidden_fraction"] <= 1.0
    assert result["prefill_s"] > 0 and result["transfer_alone_s"] > 0
