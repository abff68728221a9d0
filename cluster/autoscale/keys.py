"""Redis key names of the autoscaler, under the state store's prefix (so clusters can share a Redis).

Model and pool names are escaped as cluster/state/keys.py escapes key parts (':' and '%'), so a model
named "a:b" can never collide with model "a" and pool "b".
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.state.keys import DEFAULT_PREFIX

LOCK_NAME = "autoscaler"  # the leader lock, through StateStore.acquire_lock


def escape(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")


def unescape(part: str) -> str:
    return part.replace("%3A", ":").replace("%25", "%")


def pool_field(model: str, pool: str) -> str:
    """One hash field per (model, pool)."""
    return f"{escape(model)}:{escape(pool)}"


def parse_pool_field(field: str) -> tuple[str, str]:
    model, _, pool = field.partition(":")
    return unescape(model), unescape(pool)


@dataclass(frozen=True)
class AutoscaleKeys:
    prefix: str = DEFAULT_PREFIX

    @property
    def events(self) -> str:
        """List of decision events as JSON, newest first, capped."""
        return self.prefix + "autoscale:events"

    @property
    def overrides(self) -> str:
        """Hash pool_field -> replicas an operator pinned the pool at."""
        return self.prefix + "autoscale:overrides"

    @property
    def desired(self) -> str:
        """Hash pool_field -> JSON {desired, replicas, at}: the leader's latest target per pool."""
        return self.prefix + "autoscale:desired"

    def arrivals(self, model: str, second: int) -> str:
        """Requests that arrived for `model` during one wall-clock second (routers INCR it)."""
        return f"{self.prefix}autoscale:arrivals:{escape(model)}:{second}"

    def latencies(self, model: str, kind: str) -> str:
        """List of recent "time value" samples (kind ttft or itl), newest first, capped."""
        return f"{self.prefix}autoscale:{kind}:{escape(model)}"
