"""The router's configuration: P/D selection policies, admission, model aliases, `auto` routing
rules, spill-over, and how often it reads the cluster state. Every field has a default; every error
names its field (`admission.max_queue: ...`, `auto.rules[1].regex: ...`).

Plain data only: which models exist is known when the router is built (core.py), so checks that need
the served models (alias targets, spill-over targets) happen there, with the same field names.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

PREFILL_POLICIES = ("round_robin", "least_loaded", "prefix_aware")
DECODE_POLICIES = ("round_robin", "least_loaded", "prefix_aware", "kv_aware")


@dataclass
class AdmissionConfig:
    """Per model: a bounded priority queue in front of a cap on requests in flight."""

    max_queue: int = 256  # requests waiting per model; one more gets 429 with Retry-After
    max_in_flight: int | None = None  # cap on a model's requests in flight; None = sum of its workers' max_num_seqs
    queue_timeout_s: float = 60.0  # a request still queued after this long gets 429
    retry_after_s: float = 1.0  # the Retry-After a refused client is told

    def __post_init__(self) -> None:
        _int_at_least("max_queue", self.max_queue, 0)
        if self.max_in_flight is not None:
            _int_at_least("max_in_flight", self.max_in_flight, 1)
        _positive("queue_timeout_s", self.queue_timeout_s)
        _positive("retry_after_s", self.retry_after_s)


@dataclass
class RouteRule:
    """One `auto` rule: every condition that is set must hold; the first matching rule wins."""

    model: str  # where a matching request goes
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    min_max_tokens: int | None = None  # bounds on the request's max_tokens
    max_max_tokens: int | None = None
    regex: str | None = None  # searched in the prompt text (chat: every message's content)
    keywords: list[str] = field(default_factory=list)  # any of them in the prompt text, case-insensitive

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        for name in ("min_prompt_tokens", "max_prompt_tokens", "min_max_tokens", "max_max_tokens"):
            if getattr(self, name) is not None:
                _int_at_least(name, getattr(self, name), 0)
        for low, high in (("min_prompt_tokens", "max_prompt_tokens"), ("min_max_tokens", "max_max_tokens")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{low} ({lo}) must be <= {high} ({hi})")
        if self.regex is not None:
            if not isinstance(self.regex, str):
                raise ValueError(f"regex must be a string, got {self.regex!r}")
            try:
                self._pattern = re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from None
        if not isinstance(self.keywords, list) or not all(isinstance(k, str) and k for k in self.keywords):
            raise ValueError(f"keywords must be a list of non-empty strings, got {self.keywords!r}")
        self._lowered = [k.lower() for k in self.keywords]

    def matches(self, text: str, num_prompt_tokens: int, max_tokens: int) -> bool:
        checks = ((self.min_prompt_tokens, num_prompt_tokens, 1), (self.max_prompt_tokens, num_prompt_tokens, -1),
                  (self.min_max_tokens, max_tokens, 1), (self.max_max_tokens, max_tokens, -1))
        for bound, value, sign in checks:
            if bound is not None and (value - bound) * sign < 0:
                return False
        if self.regex is not None and self._pattern.search(text) is None:
            return False
        if self._lowered:
            lowered = text.lower()
            if not any(k in lowered for k in self._lowered):
                return False
        return True


@dataclass
class AutoRoute:
    """A rule-routed alias: requests naming `alias` go to the first matching rule's model, else `default`."""

    default: str  # the model when no rule matches
    rules: list[RouteRule] = field(default_factory=list)  # in order; the first match wins
    alias: str = "auto"  # the name clients send

    def __post_init__(self) -> None:
        if not isinstance(self.default, str) or not self.default:
            raise ValueError(f"default must be a non-empty string, got {self.default!r}")
        if not isinstance(self.alias, str) or not self.alias:
            raise ValueError(f"alias must be a non-empty string, got {self.alias!r}")
        if not isinstance(self.rules, list):
            raise ValueError(f"rules must be a list, got {self.rules!r}")
        self.rules = [r if isinstance(r, RouteRule) else from_dict(RouteRule, r, f"rules[{i}]")
                      for i, r in enumerate(self.rules)]

    def target(self, text: str, num_prompt_tokens: int, max_tokens: int) -> str:
        for rule in self.rules:
            if rule.matches(text, num_prompt_tokens, max_tokens):
                return rule.model
        return self.default


@dataclass
class RouterConfig:
    """The `router` section of the cluster config."""

    prefill_policy: str = "least_loaded"  # round_robin | least_loaded | prefix_aware
    decode_policy: str = "least_loaded"  # round_robin | least_loaded | prefix_aware | kv_aware
    prefix_load_weight: float = 64.0  # prefix_aware: cached prompt tokens one unit of load is worth
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)  # per-model queue and in-flight cap
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> served model
    auto: AutoRoute | None = None  # a rule-routed alias (`auto` unless renamed)
    spill_over: dict[str, str] = field(default_factory=dict)  # model -> model to use when its queue is full
    poll_interval_s: float = 0.5  # how often workers, loads and queue depths are synced with Redis
    auth: Any = field(default_factory=dict)  # API keys and rate limits: cluster/router/auth.py AuthConfig

    def __post_init__(self) -> None:
        for name, allowed in (("prefill_policy", PREFILL_POLICIES), ("decode_policy", DECODE_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not isinstance(self.prefix_load_weight, int | float) or self.prefix_load_weight < 0:
            raise ValueError(f"prefix_load_weight must be a number >= 0, got {self.prefix_load_weight!r}")
        if isinstance(self.admission, dict):
            self.admission = from_dict(AdmissionConfig, self.admission, "admission")
        if isinstance(self.auto, dict):
            self.auto = from_dict(AutoRoute, self.auto, "auto")
        for name in ("aliases", "spill_over"):
            mapping = getattr(self, name)
            if not isinstance(mapping, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                                        for k, v in mapping.items()):
                raise ValueError(f"{name} must map names to model names, got {mapping!r}")
        for model, target in self.spill_over.items():
            if model == target:
                raise ValueError(f"spill_over.{model}: a model cannot spill over to itself")
        if self.auto is not None and self.auto.alias in self.aliases:
            raise ValueError(f"auto.alias: {self.auto.alias!r} is also in aliases")
        _positive("poll_interval_s", self.poll_interval_s)
        from cluster.router.auth import AuthConfig  # its own module checks its own section

        if not isinstance(self.auth, AuthConfig):
            if not isinstance(self.auth, dict):
                raise ValueError(f"auth must be a mapping, got {self.auth!r}")
            try:
                self.auth = AuthConfig.from_dict(self.auth)
            except ValueError as exc:
                message = str(exc)
                raise ValueError(message if message.startswith("auth") else f"auth.{message}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | RouterConfig | None) -> RouterConfig:
        if isinstance(data, RouterConfig):
            return data
        return from_dict(cls, data or {}, "")


def from_dict(cls, data: Any, prefix: str):
    """Build a config dataclass from a mapping, naming the field in every error."""
    dotted = prefix + "." if prefix else ""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'router'}: must be a mapping, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{dotted}{unknown[0]}: unknown field")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
               and f.name not in data]
    if missing:
        raise ValueError(f"{dotted}{missing[0]}: required")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{dotted}{exc}") from None


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
