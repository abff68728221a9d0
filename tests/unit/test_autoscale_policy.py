"""The autoscaling policy file: defaults as Ray Serve's, errors naming the field, hot reload by mtime."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.autoscale.policy import AutoscalePolicy, PolicyFile, PoolPolicy

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config" / "autoscale.example.yaml"


def test_defaults_follow_ray_serve():
    p = PoolPolicy(model="m", pool="decode")
    assert (p.min_replicas, p.max_replicas, p.upscale_delay_s, p.downscale_delay_s) == (1, 1, 30.0, 600.0)
    assert p.downscale_to_zero_delay_s is None and p.to_zero_delay_s == 600.0
    assert p.target_queue_depth == 2.0 and AutoscalePolicy().look_back_period_s == 30.0


def test_defaults_section_applies_to_every_pool_and_entries_win():
    policy = AutoscalePolicy.from_dict({
        "leader_lock_ttl_s": 4,
        "defaults": {"max_replicas": 5, "upscale_delay_s": 1},
        "pools": [{"model": "m", "pool": "prefill"}, {"model": "m", "pool": "decode", "max_replicas": 8}],
    })
    assert [(p.pool, p.max_replicas, p.upscale_delay_s) for p in policy.pools] == [
        ("prefill", 5, 1), ("decode", 8, 1)]
    assert policy.pool("m", "decode").max_replicas == 8 and policy.pool("m", "unified") is None
    assert policy.tick_s == pytest.approx(4 / 3)


@pytest.mark.parametrize(("data", "error"), [
    ({"pools": [{"model": "m", "pool": "decode", "min_replicas": 3, "max_replicas": 2}]},
     "pools[0].max_replicas: must be >= min_replicas (3), got 2"),
    ({"pools": [{"model": "m", "pool": "decode"}, {"model": "m", "pool": "batch"}]},
     "pools[1].pool: must be one of prefill, decode, unified, got 'batch'"),
    ({"pools": [{"pool": "decode"}]}, "pools[0].model: required"),
    ({"pools": [{"model": "m", "pool": "decode", "target_queue_depth": 0}]},
     "pools[0].target_queue_depth: must be a number > 0, got 0"),
    ({"pools": [{"model": "m", "pool": "decode", "kv_usage_high": 1.5}]},
     "pools[0].kv_usage_high: must be a fraction in [0, 1], got 1.5"),
    ({"pools": [{"model": "m", "pool": "decode", "kv_usage_high": 0.5, "kv_usage_low": 0.7}]},
     "pools[0].kv_usage_low: must be <= kv_usage_high (0.5), got 0.7"),
    ({"pools": [{"model": "m", "pool": "decode", "max_step": True}]},
     "pools[0].max_step: must be an integer >= 1, got True"),
    ({"pools": [{"model": "m", "pool": "decode", "upscale_dealy_s": 1}]}, "pools[0].upscale_dealy_s: unknown field"),
    ({"defaults": {"max_replica": 2}}, "defaults.max_replica: unknown field"),
    ({"pools": [{"model": "m", "pool": "decode"}, {"model": "m", "pool": "decode"}]},
     "pools[1]: model 'm' pool 'decode' appears twice"),
    ({"drain_timeout_s": -1}, "drain_timeout_s: must be a number > 0, got -1"),
    ({"pools": {"model": "m"}}, "pools: must be a list"),
])
def test_errors_name_the_field(data, error):
    with pytest.raises(ValueError) as info:
        AutoscalePolicy.from_dict(data)
    assert str(info.value).startswith(error)


def test_the_example_file_loads_and_documents_every_field():
    policy = AutoscalePolicy.from_yaml(EXAMPLE)
    assert policy.pools
    text = EXAMPLE.read_text()
    for name in [*PoolPolicy.__dataclass_fields__, *AutoscalePolicy.__dataclass_fields__]:
        assert f"{name}:" in text, f"{name} is not documented in {EXAMPLE.name}"


def test_a_file_is_reloaded_when_it_changes_and_a_bad_change_keeps_the_last_good_policy(tmp_path):
    path = tmp_path / "autoscale.yaml"
    path.write_text("pools:\n  - {model: m, pool: decode, max_replicas: 2}\n")
    source = PolicyFile(path)
    assert source.current().pool("m", "decode").max_replicas == 2

    path.write_text("pools:\n  - {model: m, pool: decode, max_replicas: 6}\n")
    _bump_mtime(path, 1)
    assert source.current().pool("m", "decode").max_replicas == 6 and source.error is None

    path.write_text("pools:\n  - {model: m, pool: decode, max_replicas: 0}\n")
    _bump_mtime(path, 2)
    assert source.current().pool("m", "decode").max_replicas == 6  # refused: the last good one stays
    assert "pools[0].max_replicas: must be an integer >= 1, got 0" in source.error

    path.write_text("pools: [\n")
    _bump_mtime(path, 3)
    assert source.current().pool("m", "decode").max_replicas == 6 and "not valid YAML" in source.error


def test_a_bad_file_at_start_up_is_an_error(tmp_path):
    path = tmp_path / "autoscale.yaml"
    path.write_text("pools:\n  - {model: m, pool: decode, min_replicas: -1}\n")
    with pytest.raises(ValueError, match=r"autoscale.yaml: pools\[0\].min_replicas: must be an integer >= 0"):
        PolicyFile(path)


def _bump_mtime(path: Path, seconds: int) -> None:
    # Two writes within the filesystem's mtime resolution would look like one: move it explicitly.
    st = path.stat()
    os.utime(path, (st.st_atime, st.st_mtime + seconds))
