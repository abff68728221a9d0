"""Starting a local Ray head in-process, for `pdserve up`, the benchmarks and the tests."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

STARTUP_ATTEMPTS = 3


def start_local_ray(*, num_cpus: int | None = None, object_store_mib: int = 100,
                    configure_logging: bool = True) -> None:
    """ray.init() a new local cluster: no dashboard, a small object store, token auth off unless set.

    Ray gives a starting raylet a fixed 30 s to register with its GCS ("The current node timed out
    during startup"); on a loaded two-core machine, right after an earlier session shut down, that is
    sometimes missed. Only that failure is retried, from a clean state; any other is raised at once.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_mib * 2**20,
                     log_to_driver=False, configure_logging=configure_logging)
            return
        except Exception as error:  # noqa: BLE001 - Ray raises a bare Exception for the startup timeout
            ray.shutdown()
            if attempt == STARTUP_ATTEMPTS or "timed out during startup" not in str(error):
                raise
            logger.warning("local Ray did not start (attempt %d of %d): %s; retrying",
                           attempt, STARTUP_ATTEMPTS, error)
