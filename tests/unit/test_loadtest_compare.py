"""Result files, comparison and sweeps of the benchmark (loadtest/results.py, compare.py, sweep.py): the
side-by-side table shows each figure of both files with the ratio B/A, sweeps pair by label, no
credential reaches a result file, sweep specs are checked."""

from __future__ import annotations

import json
import math

import pytest

from loadtest import results
from loadtest.arrival import Arrival
from loadtest.compare import compare_docs, ratio
from loadtest.measure import summarize
from loadtest.record import RequestRecord
from loadtest.sweep import Sweep


def run(label: str, ttft: float, num: int, duration: float) -> dict:
    records = [RequestRecord(i, start=0.1 * i, chunk_times=[ttft, ttft + 0.02], end=ttft + 0.02,
                             num_input_tokens=8, num_output_tokens=2) for i in range(num)]
    records.append(RequestRecord(num, error="http_429"))
    return results.run_entry(label, {}, 0.0, summarize(records, duration), records)


def rows(text: str) -> dict[str, list[str]]:
    """The table's rows by label: label → the cells after it."""
    out = {}
    for line in text.splitlines():
        parts = [p for p in line.split("  ") if p.strip()]
        if len(parts) >= 4:
            out[parts[0].strip()] = [p.strip() for p in parts[1:]]
    return out


def test_compare_prints_each_figure_side_by_side_with_the_ratio():
    a = results.document({"backend": "openai", "base_url": "http://a"}, [run("run", 0.1, 10, 5.0)])
    b = results.document({"backend": "openai", "base_url": "http://b"}, [run("run", 0.05, 20, 5.0)])
    text = compare_docs(a, b, ("a.json", "b.json"))
    table = rows(text)
    assert table["Request throughput (req/s)"] == ["2.00", "4.00", "2.00x"]
    assert table["Output tokens"] == ["20", "40", "2.00x"]
    assert table["TTFT P50 (ms)"] == ["100.00", "50.00", "0.50x"]
    assert table["E2E mean (ms)"] == ["120.00", "70.00", "0.58x"]
    assert table["Failed requests"] == ["1", "1", "1.00x"]
    assert "http_429 1 vs 1" in text
    assert "a.json" in text and "http://b" in text


def test_sweeps_pair_runs_by_label():
    a = results.document({}, [run("rate=1", 0.1, 4, 4.0), run("rate=2", 0.2, 4, 2.0)])
    b = results.document({}, [run("rate=2", 0.1, 4, 2.0), run("rate=4", 0.3, 4, 1.0)])
    text = compare_docs(a, b)
    assert "== rate=2 ==" in text and "rate=1" not in text and "rate=4" not in text
    assert rows(text)["TTFT P50 (ms)"] == ["200.00", "100.00", "0.50x"]
    with pytest.raises(ValueError, match="share no run label"):
        compare_docs(a, results.document({}, [run("rate=8", 0.1, 2, 1.0), run("rate=9", 0.1, 2, 1.0)]))


def test_ratio_of_missing_or_zero_is_a_dash():
    assert ratio(None, 1.0) == "-" and ratio(0.0, 1.0) == "-" and ratio(2.0, 1.0) == "0.50x"


def test_result_files_hold_no_credentials(tmp_path):
    config = {"api_key": "sk-live-123", "base_url": "http://u:sk-live-123@host", "max_tokens": 5, "tokenizer": "m",
              "use_token_ids": True, "extra": {"Authorization": "Bearer x", "hf_token": "t", "num_tokens": 3}}
    record = RequestRecord(0, error="http_401", error_detail="unknown key sk-live-123")
    doc = results.document(config, [results.run_entry("run", {}, 0.0, summarize([record], 1.0), [record])])
    assert "api_key" not in doc["config"] and doc["config"]["extra"] == {"num_tokens": 3}
    assert doc["config"]["max_tokens"] == 5 and doc["config"]["use_token_ids"] is True
    path = tmp_path / "r.json"
    results.write(path, doc, secrets=("sk-live-123",))
    assert "sk-live-123" not in path.read_text()
    again = results.read(path)
    assert again["runs"][0]["records"][0]["error_detail"] == "unknown key [redacted]"
    assert {"hostname", "python", "num_cpus"} <= set(again["machine"]) and again["date"]


def test_reading_something_else_names_the_file(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"runs": []}))
    with pytest.raises(ValueError, match="other.json: not a loadtest result file"):
        results.read(path)
    with pytest.raises(ValueError, match="missing.json: cannot read"):
        results.read(tmp_path / "missing.json")


def test_sweep_specs_and_the_arrival_of_each_point():
    sweep = Sweep.parse("rate=1,2,inf")
    assert sweep.values == (1.0, 2.0, math.inf) and sweep.label(2.0) == "rate=2"
    assert sweep.arrival(Arrival("gamma", rate=1.0, burstiness=0.5), 4.0) == Arrival("gamma", 4.0, 0.5)
    users = Sweep.parse("concurrency=1,8").arrival(Arrival(), 8)
    assert users.is_closed and users.concurrency == 8
    with pytest.raises(ValueError, match="open-loop"):
        sweep.arrival(Arrival("closed", concurrency=2), 1.0)
    for bad in ("rate", "speed=1,2", "concurrency=1.5", "rate=a,b", "burstiness=inf"):
        with pytest.raises(ValueError, match="sweep"):
            Sweep.parse(bad)
