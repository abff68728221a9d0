"""Registry and load records across versions: new fields, defaults for old records, unknown fields."""

from __future__ import annotations

import json

import pytest

from cluster.state import LoadReport, WorkerInfo


def test_worker_info_carries_block_size_and_validates_it() -> None:
    w = WorkerInfo("m-decode-1", "m", "decode", "127.0.0.1:5000", block_size=32)
    assert WorkerInfo.from_json(w.to_json()).block_size == 32
    with pytest.raises(ValueError, match="block_size"):
        WorkerInfo("x", "m", "decode", "h:1", block_size=0)


def test_records_from_older_and_newer_versions_still_load() -> None:
    old = json.dumps({"worker_id": "x", "model": "m", "role": "prefill", "address": "h:1", "tp": 1, "started_at": 2.0})
    assert WorkerInfo.from_json(old).block_size == WorkerInfo("y", "m", "prefill", "h:1").block_size
    newer = json.dumps({**json.loads(old), "gpu": "h100"})
    assert WorkerInfo.from_json(newer) == WorkerInfo.from_json(old)

    report = LoadReport(1, 2, 3, 4, 5, 0.5, prefix_cache_hits=6, prefix_cache_queries=7, kv_transfer_bytes=8,
                        kv_transfer_fallbacks=9, max_num_seqs=10)
    assert LoadReport.from_json(report.to_json()) == report
    legacy = {k: v for k, v in json.loads(report.to_json()).items() if k not in ("prefix_cache_hits", "max_num_seqs")}
    loaded = LoadReport.from_json(json.dumps({**legacy, "future_field": 1}))
    assert (loaded.prefix_cache_hits, loaded.max_num_seqs, loaded.kv_transfer_bytes) == (0, 0, 8)
