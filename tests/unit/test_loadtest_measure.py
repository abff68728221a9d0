"""The benchmark's figures (loadtest/measure.py, loadtest/record.py) on hand-made records, checked to
exact values: vLLM's definitions of TTFT, TPOT, ITL and E2E, numpy's linear percentiles, throughput
over the run's duration, goodput under an SLO, errors by type and cut requests apart."""

from __future__ import annotations

import pytest

from loadtest.measure import SLO, distribution, peak_concurrency, summarize
from loadtest.record import RequestRecord


def records() -> list[RequestRecord]:
    return [
        # three tokens, one chunk each: TTFT 0.1, gaps 0.05 and 0.1, E2E 0.3, TPOT (0.3-0.1)/2
        RequestRecord(0, scheduled=0.0, start=0.0, chunk_times=[0.1, 0.15, 0.25], end=0.3, num_input_tokens=10,
                      num_output_tokens=3, output_tokens_from="usage"),
        # five tokens (usage) in two chunks: one gap of 0.1; TPOT (0.4-0.2)/4
        RequestRecord(1, scheduled=0.1, start=0.2, chunk_times=[0.2, 0.3], end=0.4, num_input_tokens=20,
                      num_output_tokens=5, output_tokens_from="usage"),
        # one token: no gap, no TPOT
        RequestRecord(2, scheduled=1.0, start=1.0, chunk_times=[0.4], end=0.4, num_input_tokens=0,
                      num_output_tokens=1, output_tokens_from="chunks"),
        RequestRecord(3, scheduled=1.1, start=1.1, error="http_429"),
        RequestRecord(4, scheduled=1.2, start=1.2, error="timeout"),
        RequestRecord(5, scheduled=1.3, start=1.3, error="http_429"),
        RequestRecord(6, scheduled=1.4, start=1.4, chunk_times=[0.2], is_cut=True, num_output_tokens=1),
    ]


def test_per_request_latencies_follow_the_definitions():
    r0, r1, r2 = records()[:3]
    assert (r0.ttft, r0.e2e) == (0.1, 0.3)
    assert r0.itl == pytest.approx([0.05, 0.1])
    assert r0.tpot == pytest.approx(0.1)
    assert r1.tpot == pytest.approx(0.05)  # tokens from usage, not chunks
    assert r2.itl == [] and r2.tpot is None


def test_counts_throughput_and_errors_by_type():
    s = summarize(records(), duration_s=2.0)
    assert (s["num_requests"], s["num_completed"], s["num_failed"], s["num_cut"]) == (7, 3, 3, 1)
    assert s["errors_by_type"] == {"http_429": 2, "timeout": 1}
    assert (s["num_input_tokens"], s["num_output_tokens"]) == (30, 9)  # completed requests only
    assert s["output_tokens_from"] == {"chunks": 1, "usage": 2}
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(4.5)
    assert s["input_throughput"] == pytest.approx(15.0)
    assert s["total_token_throughput"] == pytest.approx(19.5)
    assert s["goodput"] is None


def test_latency_distributions_exact():
    s = summarize(records(), duration_s=2.0)
    ttft = s["ttft"]  # [0.1, 0.2, 0.4]
    assert ttft["n"] == 3
    assert ttft["mean"] == pytest.approx(0.7 / 3)
    assert (ttft["min"], ttft["max"]) == (0.1, 0.4)
    assert ttft["p50"] == pytest.approx(0.2)
    assert ttft["p90"] == pytest.approx(0.36)  # linear: 0.2 + 0.8 · (0.4 - 0.2)
    assert ttft["p95"] == pytest.approx(0.38)
    assert ttft["p99"] == pytest.approx(0.396)
    assert s["tpot"]["n"] == 2 and s["tpot"]["mean"] == pytest.approx(0.075)  # the one-token request has none
    itl = s["itl"]  # pooled gaps of completed requests: [0.05, 0.1, 0.1]
    assert itl["n"] == 3 and itl["mean"] == pytest.approx(0.25 / 3) and itl["p50"] == pytest.approx(0.1)
    e2e = s["e2e"]  # [0.3, 0.4, 0.4]
    assert e2e["mean"] == pytest.approx(1.1 / 3) and e2e["p50"] == pytest.approx(0.4)
    assert s["client_lag"]["max"] == pytest.approx(0.1)  # request 1 went out 0.1 s after its time
    assert s["peak_concurrency"] == 2  # requests 0 and 1 overlap on [0.2, 0.3]
    # Chunks by second from the first send: r0 at 0.1, 0.15, 0.25; r1 at 0.4, 0.5; r2 at 1.4.
    assert s["peak_output_throughput"] == 5.0


def test_goodput_counts_requests_within_every_bound():
    # r0: TPOT 0.1 too slow; r1 meets both; r2: TTFT 0.4 too slow
    s = summarize(records(), duration_s=2.0, slo=SLO(ttft=0.25, tpot=0.08))
    assert s["goodput"]["num_good"] == 1
    assert s["goodput"]["requests_per_s"] == pytest.approx(0.5)
    assert s["goodput"]["fraction"] == pytest.approx(1 / 7)
    # A one-token request has no TPOT: a TPOT bound alone lets it through.
    assert summarize(records(), 2.0, SLO(tpot=0.08))["goodput"]["num_good"] == 2
    assert summarize(records(), 2.0, SLO(e2e=0.35))["goodput"]["num_good"] == 1


def test_slo_parsing():
    assert SLO.parse("ttft=0.5,tpot=0.05") == SLO(ttft=0.5, tpot=0.05)
    assert SLO.parse("ttft=500ms, e2e=10s") == SLO(ttft=0.5, e2e=10.0)
    for bad, field in [("itl=1", "slo"), ("ttft=fast", "slo ttft"), ("ttft=0", "slo ttft"), ("", "slo")]:
        with pytest.raises(ValueError, match=field):
            SLO.parse(bad)


def test_empty_runs_have_no_figures_rather_than_zeros():
    s = summarize([RequestRecord(0, error="connect_error")], duration_s=1.0)
    assert s["num_completed"] == 0 and s["request_throughput"] == 0.0
    assert s["ttft"]["n"] == 0 and s["ttft"]["p99"] is None
    assert distribution([]) == {"n": 0, "mean": None, "std": None, "min": None, "p50": None, "p90": None,
                                "p95": None, "p99": None, "max": None}
    assert peak_concurrency([]) == 0


def test_records_round_trip_through_json_without_their_text():
    record = records()[1]
    record.output_text = "the answer"
    data = record.to_json()
    assert "output_text" not in data and data["ttft"] == 0.2 and data["tpot"] == pytest.approx(0.05)
    again = RequestRecord.from_json(data)
    assert again.chunk_times == record.chunk_times and again.tpot == pytest.approx(record.tpot)
