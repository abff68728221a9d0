"""`pdserve status` rendering and Redis URL resolution, without a Redis server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.state import LoadReport
from cluster.status import (
    UP_FILE,
    ClusterStatus,
    PoolStatus,
    WorkerRow,
    render_status,
    resolve_redis_url,
    status_to_dict,
)


def row(wid: str, port: int, load: LoadReport | None, cached: int = 0, tp: int = 1) -> WorkerRow:
    return WorkerRow(wid, f"127.0.0.1:{port}", tp, 16, 1.0e9, load, cached)


def sample() -> ClusterStatus:
    busy = LoadReport(num_running=3, num_waiting=2, num_waiting_for_kv=1, num_free_blocks=48, num_total_blocks=64,
                      kv_usage=0.25, max_num_seqs=8)
    idle = LoadReport(0, 0, 0, 512, 512, 0.0)
    return ClusterStatus("unix:///tmp/r.sock", [
        PoolStatus("tiny", "prefill", 4, [row("tiny-prefill-aaaa0001", 5001, idle, cached=7)]),
        PoolStatus("tiny", "decode", 0, [row("tiny-decode-bbbb0002", 5002, busy, cached=12, tp=2),
                                         row("tiny-decode-cccc0003", 5003, None)]),
        PoolStatus("big", "unified", 9, []),  # a router queues for it, no worker is up
    ])


def test_render_groups_pools_by_model_with_a_row_per_worker() -> None:
    text = render_status(sample())
    lines = text.splitlines()
    assert "3 live workers, 2 models" in lines[0] and "unix:///tmp/r.sock" in lines[0]
    assert text.index("model tiny") < text.index("pool prefill") < text.index("pool decode") < text.index("model big")
    assert "pool prefill: 1 worker, queue depth 4" in text
    assert "pool decode: 2 workers, queue depth 0" in text
    assert "pool unified: 0 workers, queue depth 9" in text

    busy = next(line for line in lines if "tiny-decode-bbbb0002" in line).split()
    # id, address, tp, running, waiting (+ waiting for KV), KV used, blocks used/total, cached
    assert busy == ["tiny-decode-bbbb0002", "127.0.0.1:5002", "2", "3", "3", "25.0%", "16/64", "12"]
    silent = next(line for line in lines if "tiny-decode-cccc0003" in line).split()
    assert silent[3:7] == ["-"] * 4 and silent[-1] == "0"

    # Columns line up: each figure ends where its header does.
    busy_line = next(line for line in lines if "tiny-decode-bbbb0002" in line)
    header = lines[lines.index(busy_line) - 1]
    assert busy_line.index("25.0%") + len("25.0%") == header.index("KV USED") + len("KV USED")


def test_render_an_empty_cluster() -> None:
    text = render_status(ClusterStatus("redis://h:1", []))
    assert "0 live workers, 0 models" in text and "no live workers" in text


def test_json_form_keeps_every_figure() -> None:
    data = json.loads(json.dumps(status_to_dict(sample())))
    assert data["num_workers"] == 3 and [m["model"] for m in data["models"]] == ["tiny", "big"]
    decode = data["models"][0]["pools"][1]
    assert decode["pool"] == "decode" and decode["num_workers"] == 2 and decode["queue_depth"] == 0
    busy, silent = decode["workers"]
    assert busy["load"]["num_running"] == 3 and busy["load"]["max_num_seqs"] == 8 and busy["tp"] == 2
    assert busy["num_cached_blocks"] == 12 and silent["load"] is None
    assert data["models"][1]["pools"] == [{"pool": "unified", "queue_depth": 9, "num_workers": 0, "workers": []}]


def test_redis_url_comes_from_the_flag_else_up_json(tmp_path: Path) -> None:
    assert resolve_redis_url("redis://x:1", tmp_path) == "redis://x:1"
    with pytest.raises(ValueError, match="pdserve up"):
        resolve_redis_url(None, tmp_path)
    (tmp_path / UP_FILE).parent.mkdir()
    (tmp_path / UP_FILE).write_text(json.dumps({"redis_url": "unix:///tmp/s.sock", "http": "x"}))
    assert resolve_redis_url(None, tmp_path) == "unix:///tmp/s.sock"
    (tmp_path / UP_FILE).write_text(json.dumps({"redis": "unix:///tmp/s.sock"}))
    with pytest.raises(ValueError, match="redis_url"):
        resolve_redis_url(None, tmp_path)
    (tmp_path / UP_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="up.json"):
        resolve_redis_url(None, tmp_path)
