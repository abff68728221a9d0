"""Redis-backed shared state: worker registry, loads, prefix index, queue depths, rate limits, locks.

Several router replicas, the workers and the autoscaler share one Redis; with no URL configured the
cluster starts an embedded one (`start_embedded_redis`). Nothing is pickled: JSON or plain Redis types.
"""

from cluster.state.base import DEFAULT_TTL_S
from cluster.state.keys import DEFAULT_PREFIX, Keys
from cluster.state.load import LoadReport
from cluster.state.registry import ROLES, Role, WorkerInfo
from cluster.state.server import EmbeddedRedis, connect, process_alive, start_embedded_redis
from cluster.state.store import StateStore, open_store

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_TTL_S",
    "ROLES",
    "EmbeddedRedis",
    "Keys",
    "LoadReport",
    "Role",
    "StateStore",
    "WorkerInfo",
    "connect",
    "open_store",
    "process_alive",
    "start_embedded_redis",
]
