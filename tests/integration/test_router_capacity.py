"""The router-capacity benchmark (loadtest/router_capacity.py) end to end on tiny numbers, so
`make bench` cannot rot: real simulated workers, the real router process, both clients."""

from __future__ import annotations

import json

from loadtest import router_capacity

N = 20


def test_every_stream_is_held_and_relays_the_workers_text(tiny_model_dir, tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "B.md"
    router_capacity.main(["--model", str(tiny_model_dir), "--steps", str(N), "--itl-sweep", "", "--max-tokens", "6", "--ttft-ms", "20",
                          "--itl-ms", "20", "--hold", "1", "--settle", "0.3", "--stream-timeout", "20",
                          "--json", str(out), "--write", str(md)])
    (step,) = json.loads(out.read_text())
    assert step["n"] == N
    for kind in ("direct", "router"):
        stats = step[kind]
        # Errors include a router text that differs from the simulated worker's tokens run through the
        # detokenizer, a usage count short of max_tokens, a missing [DONE] and any HTTP or gRPC error.
        assert stats["errors"] == 0, (kind, stats["errors_by_type"])
        assert stats["held_peak"] == N and stats["held_min"] == N, kind  # slots go straight to their next stream
        assert stats["completed"] >= N, kind  # every slot finished a stream (a 0.14 s one) in the 1 s window
        assert stats["ttft_n"] > 0 and stats["delay_n"] > 0 and stats["num_tokens"] > 0, kind
        assert stats["ttft_p50"] >= 0.02, kind  # nothing arrives before the worker's TTFT
    assert step["router"]["cpu"]["router"] > 0 and step["router_us_per_token"] > 0
    text = md.read_text()
    assert "<!-- router-capacity:begin -->" in text and f"| {N} |" in text
