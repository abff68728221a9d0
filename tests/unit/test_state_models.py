"""State records and key names, without a Redis server: JSON round trips, validation, escaping."""

from __future__ import annotations

import pytest

from cluster.state import Keys, LoadReport, WorkerInfo
from cluster.state.base import ttl_ms


def test_worker_info_json_round_trip_and_validation() -> None:
    w = WorkerInfo("x", "m", "simulated", "127.0.0.1:5000", tp=2, started_at=1.5)
    assert WorkerInfo.from_json(w.to_json()) == w
    with pytest.raises(ValueError, match="role"):
        WorkerInfo("x", "m", "bogus", "h:1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="address"):
        WorkerInfo("x", "m", "decode", "nohostport")
    with pytest.raises(ValueError, match="tp"):
        WorkerInfo("x", "m", "decode", "h:1", tp=0)


def test_load_report_json_round_trip() -> None:
    r = LoadReport(1, 2, 3, 4, 5, 0.25)
    assert LoadReport.from_json(r.to_json()) == r


def test_keys_are_prefixed_and_unambiguous() -> None:
    k = Keys("pdserve:")
    assert k.worker("w1") == "pdserve:worker:w1"
    assert k.queue_depth("a:b", "c", "r") != k.queue_depth("a", "b:c", "r")
    assert Keys("other:").lock("x").startswith("other:")
    assert "secret" not in k.rate("secret")


def test_ttl_ms_rejects_nonpositive() -> None:
    assert ttl_ms(1.5) == 1500
    with pytest.raises(ValueError):
        ttl_ms(0)
