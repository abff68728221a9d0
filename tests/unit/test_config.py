"""Config validation: every error names its field; the example file documents every field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cluster.config import ClusterConfig, EngineConfig

EXAMPLE = Path(__file__).parents[2] / "deploy" / "config" / "example.yaml"


def test_example_config_loads_and_lists_every_engine_field():
    config = ClusterConfig.from_yaml(EXAMPLE)
    assert config.engine == EngineConfig()
    text = EXAMPLE.read_text()
    for f in dataclasses.fields(EngineConfig):
        assert f"  {f.name}:" in text, f"deploy/config/example.yaml lacks engine.{f.name}"


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
    path.write_text(yaml.safe_dump({"model": "m", "engine": engine}))
    with pytest.raises(ValueError, match=field):
        ClusterConfig.from_yaml(path)
