"""Shared fixtures: tiny HF-format checkpoints, written once per test session.

The directories are shared by every test in the session: treat them as read-only (copy one into
tmp_path before editing its config or weights).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cluster.model.presets import make_model

MakeModelDir = Callable[..., Path]


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    """One intra-op thread unless PDSERVE_TEST_THREADS says otherwise: test shapes are tiny, and on a
    shared, loaded machine every multi-threaded op waits on a busy core (measured 40x slower here)."""
    torch.set_num_threads(int(os.environ.get("PDSERVE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def preset_model_dir(tmp_path_factory: pytest.TempPathFactory) -> MakeModelDir:
    """preset_model_dir(preset="tiny", *, seed=0, dtype=None, num_shards=1) -> checkpoint dir, made once."""
    made: dict[tuple, Path] = {}

    def make(preset: str = "tiny", *, seed: int = 0, dtype: str | None = None, num_shards: int = 1) -> Path:
        key = (preset, seed, dtype, num_shards)
        if key not in made:
            name = f"{preset}-s{seed}-{dtype or 'default'}-x{num_shards}"
            made[key] = make_model(preset, tmp_path_factory.mktemp(name), seed=seed, dtype=dtype,
                                   num_shards=num_shards)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(preset_model_dir: MakeModelDir) -> Path:
    """The `tiny` preset (Llama, 4 layers, hidden 256, vocab 2048), float32, seed 0."""
    return preset_model_dir("tiny")
