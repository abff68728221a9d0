"""The router-capacity benchmark runs end to end on tiny numbers, so `make bench` cannot rot."""

from __future__ import annotations

import json

from loadtest import router_capacity


def test_router_capacity_completes_every_stream(tiny_model_dir, tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "B.md"
    router_capacity.main(["--model", str(tiny_model_dir), "--steps", "20", "--max-tokens", "6", "--ttft-ms", "20",
                          "--itl-ms", "20", "--stream-timeout", "20", "--json", str(out), "--write", str(md)])
    (step,) = json.loads(out.read_text())
    assert step["n"] == 20
    for path in ("direct", "router"):
        assert step[path]["completed"] == 20 and step[path]["errors"] == 0, step[path]["errors_by_type"]
        assert step[path]["peak_streams"] >= 1 and step[path]["ttft_p50"] > 0
    text = md.read_text()
    assert "<!-- router-capacity:begin -->" in text and "| 20 | 20 |" in text
