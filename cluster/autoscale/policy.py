"""The autoscaling policy: per (model, pool) bounds, targets, SLOs and stabilisation windows.

One YAML file (deploy/config/autoscale.example.yaml documents every field); the same mapping is
meant to sit under an `autoscaling:` key of the cluster config and the Helm values. Every field has a
default, and where Ray Serve's AutoscalingConfig has a field with the same meaning the default and the
name follow it (min_replicas 1, max_replicas 1, upscale_delay_s 30, downscale_delay_s 600,
downscale_to_zero_delay_s = downscale_delay_s, look_back_period_s 30, and target_queue_depth 2 as
target_ongoing_requests when no replica capacity is known: see decide.py).

Errors name the field, with its place in the file: `pools[1].max_replicas: must be >= min_replicas (2),
got 1`. `PolicyFile` re-reads the file when its mtime changes; a change that does not validate is
reported and the last good policy stays in force, so a typo never stops the controller.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

POOLS = ("prefill", "decode", "unified")


@dataclass(frozen=True)
class PoolPolicy:
    model: str  # served model name (as workers register it)
    pool: str  # prefill | decode | unified
    min_replicas: int = 1  # never fewer (0 allows scale to zero)
    max_replicas: int = 1  # never more
    target_queue_depth: float = 2.0  # requests waiting per replica the pool aims at (see decide.py)
    replica_capacity: int | None = None  # requests one replica runs at once; None = its workers' max_num_seqs
    upscale_delay_s: float = 30.0  # an upscale must be wanted this long, uninterrupted, before it happens
    downscale_delay_s: float = 600.0  # likewise a downscale (to one replica or more)
    downscale_to_zero_delay_s: float | None = None  # the step 1 -> 0; None = downscale_delay_s
    max_step: int | None = None  # most replicas added or removed by one decision; None = no limit
    decision_interval_s: float = 10.0  # time between two decisions for this pool
    ttft_p95_s: float | None = None  # SLO: P95 time to first token above this asks for one more replica
    itl_p95_s: float | None = None  # SLO: P95 inter-token latency above this asks for one more replica
    kv_usage_high: float | None = None  # mean KV-cache usage (0..1) above this asks for one more replica
    kv_usage_low: float | None = None  # no downscale while mean KV-cache usage is above this

    def __post_init__(self) -> None:
        _text("model", self.model)
        if self.pool not in POOLS:
            raise ValueError(f"pool: must be one of {', '.join(POOLS)}, got {self.pool!r}")
        _int_at_least("min_replicas", self.min_replicas, 0)
        _int_at_least("max_replicas", self.max_replicas, 1)
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas: must be >= min_replicas ({self.min_replicas}), got {self.max_replicas}")
        _number("target_queue_depth", self.target_queue_depth, positive=True)
        if self.replica_capacity is not None:
            _int_at_least("replica_capacity", self.replica_capacity, 1)
        _number("upscale_delay_s", self.upscale_delay_s)
        _number("downscale_delay_s", self.downscale_delay_s)
        if self.downscale_to_zero_delay_s is not None:
            _number("downscale_to_zero_delay_s", self.downscale_to_zero_delay_s)
        if self.max_step is not None:
            _int_at_least("max_step", self.max_step, 1)
        _number("decision_interval_s", self.decision_interval_s, positive=True)
        for name in ("ttft_p95_s", "itl_p95_s"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), positive=True)
        for name in ("kv_usage_high", "kv_usage_low"):
            value = getattr(self, name)
            if value is not None:
                _number(name, value)
                if value > 1:
                    raise ValueError(f"{name}: must be a fraction in [0, 1], got {value!r}")
        if (self.kv_usage_high is not None and self.kv_usage_low is not None
                and self.kv_usage_low > self.kv_usage_high):
            raise ValueError(f"kv_usage_low: must be <= kv_usage_high ({self.kv_usage_high}), got {self.kv_usage_low}")

    @property
    def key(self) -> tuple[str, str]:
        return (self.model, self.pool)

    @property
    def to_zero_delay_s(self) -> float:
        return self.downscale_delay_s if self.downscale_to_zero_delay_s is None else self.downscale_to_zero_delay_s


@dataclass(frozen=True)
class AutoscalePolicy:
    pools: tuple[PoolPolicy, ...] = ()  # one entry per autoscaled (model, pool); others are left alone
    leader_lock_ttl_s: float = 10.0  # the leader's Redis lock expires this long after its last renewal
    drain_timeout_s: float = 600.0  # a drained replica is stopped after this long even if requests remain
    look_back_period_s: float = 30.0  # window of arrival rate and latency percentiles (Ray Serve's name)

    def __post_init__(self) -> None:
        if isinstance(self.pools, list):
            object.__setattr__(self, "pools", tuple(self.pools))
        seen: set[tuple[str, str]] = set()
        for i, p in enumerate(self.pools):
            if not isinstance(p, PoolPolicy):
                raise ValueError(f"pools[{i}]: must be a PoolPolicy, got {p!r}")
            if p.key in seen:
                raise ValueError(f"pools[{i}]: model {p.model!r} pool {p.pool!r} appears twice")
            seen.add(p.key)
        _number("leader_lock_ttl_s", self.leader_lock_ttl_s, positive=True)
        _number("drain_timeout_s", self.drain_timeout_s, positive=True)
        _number("look_back_period_s", self.look_back_period_s, positive=True)

    def pool(self, model: str, pool: str) -> PoolPolicy | None:
        return next((p for p in self.pools if p.key == (model, pool)), None)

    @property
    def tick_s(self) -> float:
        """How often the controller wakes: the shortest decision interval, and often enough to renew
        its lock well before it expires."""
        intervals = [p.decision_interval_s for p in self.pools] or [1.0]
        return min(*intervals, self.leader_lock_ttl_s / 3)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AutoscalePolicy:
        """The file's mapping; `defaults` (any PoolPolicy field) applies to every entry of `pools`."""
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"autoscaling: must be a mapping, got {data!r}")
        data = dict(data or {})
        defaults = data.pop("defaults", None) or {}
        if not isinstance(defaults, dict):
            raise ValueError(f"defaults: must be a mapping, got {defaults!r}")
        _check_known(PoolPolicy, defaults, "defaults.")
        entries = data.pop("pools", None) or []
        if not isinstance(entries, list):
            raise ValueError(f"pools: must be a list of pool entries, got {entries!r}")
        pools = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f"pools[{i}]: must be a mapping, got {entry!r}")
            pools.append(_build(PoolPolicy, {**defaults, **entry}, f"pools[{i}]."))
        return _build(cls, {**data, "pools": tuple(pools)}, "")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> AutoscalePolicy:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from None
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


@dataclass
class PolicyFile:
    """A policy file, re-read when its mtime changes (`current()` is cheap: one stat)."""

    path: Path
    policy: AutoscalePolicy = field(init=False)
    error: str | None = field(default=None, init=False)  # why the latest change was refused, if it was
    _mtime: float = field(default=-1.0, init=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._mtime = self.path.stat().st_mtime
        self.policy = AutoscalePolicy.from_yaml(self.path)  # a bad file at start-up is fatal

    def current(self) -> AutoscalePolicy:
        try:
            mtime = self.path.stat().st_mtime
        except OSError as exc:
            self._refuse(f"{self.path}: cannot read it ({exc})")
            return self.policy
        if mtime != self._mtime:
            self._mtime = mtime
            try:
                self.policy = AutoscalePolicy.from_yaml(self.path)
                self.error = None
                logger.info("autoscaling policy reloaded from %s", self.path)
            except (OSError, ValueError) as exc:
                self._refuse(str(exc))
        return self.policy

    def _refuse(self, error: str) -> None:
        if error != self.error:
            logger.error("autoscaling policy change refused, the previous one stays in force: %s", error)
        self.error = error


def _build(cls, data: dict[str, Any], where: str):
    _check_known(cls, data, where)
    try:
        return cls(**data)
    except TypeError as exc:  # a required field is missing
        missing = re.search(r"'(\w+)'", str(exc))
        if missing is None:
            raise
        raise ValueError(f"{where}{missing.group(1)}: required") from None
    except ValueError as exc:
        raise ValueError(f"{where}{exc}") from None


def _check_known(cls, data: dict[str, Any], where: str) -> None:
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{where}{unknown[0]}: unknown field")


def _text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: must be a non-empty string, got {value!r}")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")


def _number(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name}: must be a number {'> 0' if positive else '>= 0'}, got {value!r}")
