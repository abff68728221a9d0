"""Config validation: every error names its field; the example file documents every field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cluster.config import ClusterConfig, EngineConfig, ModelDeployment
from cluster.router.auth import AuthConfig, Limits
from cluster.router.config import AdmissionConfig, AutoRoute, RouterConfig, RouteRule

EXAMPLE = Path(__file__).parents[2] / "deploy" / "config" / "example.yaml"


def test_example_config_loads_with_every_default():
    config = ClusterConfig.from_yaml(EXAMPLE)
    assert config.engine == EngineConfig()
    assert config.models == [ModelDeployment()]
    defaults = ClusterConfig()
    for f in dataclasses.fields(ClusterConfig):
        if f.name not in ("engine", "models", "router"):
            assert getattr(config, f.name) == getattr(defaults, f.name), f.name
    assert config.router == RouterConfig()


def test_router_section_errors_name_the_field():
    with pytest.raises(ValueError, match=r"router\.admission\.max_queue"):
        ClusterConfig(router={"admission": {"max_queue": -1}})
    with pytest.raises(ValueError, match=r"router\.decode_policy"):
        ClusterConfig(router={"decode_policy": "random"})


@pytest.mark.parametrize("cls", [ClusterConfig, EngineConfig, ModelDeployment, RouterConfig, AdmissionConfig,
                                 AutoRoute, RouteRule, AuthConfig, Limits])
def test_example_config_documents_every_field(cls):
    lines = EXAMPLE.read_text().splitlines()
    for f in dataclasses.fields(cls):
        documented = [line for line in lines if line.lstrip(" -#").startswith(f"{f.name}:")]
        assert documented, f"deploy/config/example.yaml lacks {cls.__name__}.{f.name}"
        assert all("#" in line for line in documented), f"{f.name} has no comment"


def test_model_engine_overrides_and_served_name():
    config = ClusterConfig(models=[{"path": "models/small", "engine": {"block_size": 32}, "decode_tp": 2},
                                   {"path": "m/tiny", "name": "fast"}],
                           engine={"max_num_seqs": 8})
    small, fast = config.models
    assert small.served_name == "small" and fast.served_name == "fast"
    engine = small.engine_config(config.engine, small.decode_tp)
    assert (engine.block_size, engine.max_num_seqs, engine.tensor_parallel_size) == (32, 8, 2)


@pytest.mark.parametrize(
    ("models", "field"),
    [
        ([{"mode": "colocated"}], r"models\[0\]\.mode"),
        ([{"prefill_tp": 2, "decode_tp": 3}], r"models\[0\]\.prefill_tp"),
        ([{"engine": {"block_size": 12}}], r"models\[0\]\.engine\.block_size"),
        ([{"kv_transport": "carrier-pigeon"}], r"models\[0\]\.kv_transport"),
        ([{}, {"path": "other/tiny"}], "used twice"),
        ([], "models"),
    ],
)
def test_bad_model_values_name_the_field(models, field):
    with pytest.raises(ValueError, match=field):
        ClusterConfig(models=models)


@pytest.mark.parametrize(
    ("engine", "field"),
    [
        ({"block_size": 12}, "block_size"),
        ({"dtype": "int3"}, "dtype"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"attention_backend": "magic"}, "attention_backend"),
        ({"scheduling_policy": "random"}, "scheduling_policy"),
        ({"no_such_thing": 1}, "no_such_thing"),
    ],
)
def test_bad_values_name_the_field(tmp_path, engine, field):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": [{"path": "m"}], "engine": engine}))
    with pytest.raises(ValueError, match=field):
        ClusterConfig.from_yaml(path)
