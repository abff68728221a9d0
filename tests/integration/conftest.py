"""Fixtures shared by the integration tests that run real Ray actors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray

from cluster.local_ray import start_local_ray


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """Local Ray (two CPUs) for one test module; shut down, every actor with it, when the module ends."""
    start_local_ray(num_cpus=2, configure_logging=False)
    yield
    ray.shutdown()
