"""API keys and per-key rate limits, shared by every router replica through Redis.

A request's life here, on either API: `Authenticator.authenticate` reads the key (HTTP
`Authorization: Bearer <key>`, gRPC `authorization` metadata with the same value) — missing or
unknown → 401 / UNAUTHENTICATED → `charge_request` spends one token of the key's request bucket →
the request is parsed and tokenized → `charge_tokens` spends prompt + n × max_tokens from the key's
token bucket (the most the request can use, known before it runs). An empty bucket → 429 /
RESOURCE_EXHAUSTED with Retry-After saying when the bucket will hold enough; a request larger than
the bucket can ever hold → 400 naming the field. The buckets live in Redis (cluster/state/ratelimit.py:
one Lua script per spend, Redis's clock), so routers sharing a Redis share each key's budget.

With no keys configured nothing is checked and nothing costs anything. If Redis cannot be reached the
request is let through (and logged): an outage of the limiter must not become an outage of serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from cluster import metrics
from cluster.router.errors import bad_request, rate_limited, unauthorized

logger = logging.getLogger(__name__)


class RateLimiter(Protocol):
    """What the buckets need: cluster.state's StateStore has it."""

    def allow(self, key: str, cost: float, rate_per_s: float, burst: float) -> tuple[bool, float]: ...


@dataclass(frozen=True)
class Limits:
    """One key's token buckets; a rate of 0 means unlimited, a burst of 0 one second's worth (at least 1)."""

    requests_per_s: float = 0.0
    requests_burst: float = 0.0
    tokens_per_s: float = 0.0  # prompt + max completion tokens
    tokens_burst: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{f.name} must be a number >= 0, got {value!r}")
        for kind in ("requests", "tokens"):
            if getattr(self, f"{kind}_burst") and not getattr(self, f"{kind}_per_s"):
                raise ValueError(f"{kind}_burst needs {kind}_per_s > 0")

    @property
    def is_limited(self) -> bool:
        return bool(self.requests_per_s or self.tokens_per_s)

    def burst(self, kind: str) -> float:
        return getattr(self, f"{kind}_burst") or max(1.0, getattr(self, f"{kind}_per_s"))


@dataclass
class AuthConfig:
    """Optional API keys and their rate limits (`limits` for every key, `per_key` overriding it)."""

    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    limits: Limits = field(default_factory=Limits)
    per_key: dict[str, Limits] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.api_keys, list | tuple) or not all(isinstance(k, str) and k for k in self.api_keys):
            raise ValueError("api_keys must be a list of non-empty strings")
        if len(set(self.api_keys)) != len(self.api_keys):
            raise ValueError("api_keys has a key twice")
        self.api_keys = list(self.api_keys)
        self.limits = _limits(self.limits, "limits")
        if not isinstance(self.per_key, dict):
            raise ValueError("per_key must map API keys to limits")
        self.per_key = {k: _limits(v, "per_key") for k, v in self.per_key.items()}
        unknown = set(self.per_key) - set(self.api_keys)
        if unknown:
            raise ValueError("per_key names a key that is not in api_keys")  # the key itself stays out of logs
        if not self.api_keys and self.limits.is_limited:
            raise ValueError("limits need api_keys: a rate limit is per key")

    @property
    def is_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def is_rate_limited(self) -> bool:
        return self.limits.is_limited or any(lim.is_limited for lim in self.per_key.values())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuthConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"auth: unknown field {sorted(unknown)[0]!r}")
        return cls(**data)


def _limits(value: Limits | dict, name: str) -> Limits:
    if isinstance(value, Limits):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping of rate limits")
    unknown = set(value) - {f.name for f in fields(Limits)}
    if unknown:
        raise ValueError(f"{name}: unknown field {sorted(unknown)[0]!r}")
    try:
        return Limits(**value)
    except ValueError as exc:
        raise ValueError(f"{name}.{exc}") from None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Authenticator:
    """Checks keys and spends their rate-limit budgets; `store` holds the buckets (needed with limits)."""

    def __init__(self, config: AuthConfig, store: RateLimiter | None = None) -> None:
        if config.is_rate_limited and store is None:
            raise ValueError("rate limits need a store (Redis) to keep their buckets in")
        self.config = config
        self._store = store
        # Keys are compared by digest: a dict lookup on a hash leaks nothing about the keys' text.
        self._keys = {_digest(k): k for k in config.api_keys}
        self._limits = {k: config.per_key.get(k, config.limits) for k in config.api_keys}
        self._last_store_warning = 0.0

    @property
    def is_enabled(self) -> bool:
        return self.config.is_enabled

    def authenticate(self, authorization: str | None) -> str | None:
        """The caller's key from an `Authorization` value, or None when keys are off; 401 otherwise."""
        if not self._keys:
            return None
        if not authorization:
            raise unauthorized("missing API key: send it as 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.strip().partition(" ")
        key = self._keys.get(_digest(token.strip())) if scheme.lower() == "bearer" else None
        if key is None:
            raise unauthorized("invalid API key")
        return key

    async def charge_request(self, key: str | None, model: str = "") -> None:
        """Spend one request from the key's budget (429 when it is empty)."""
        if key is not None and self._limits[key].requests_per_s:
            await self._spend(key, "requests", 1.0, model)

    async def charge_tokens(self, key: str | None, num_prompt_tokens: int, max_new_tokens: int,
                            model: str = "") -> None:
        """Spend the most tokens the request may use (prompt + every choice's max_tokens)."""
        if key is None or not self._limits[key].tokens_per_s:
            return
        burst = self._limits[key].burst("tokens")
        cost = num_prompt_tokens + max_new_tokens
        if cost > burst:  # could never be allowed: waiting would not help
            field_name = "prompt" if num_prompt_tokens > burst else "max_tokens"
            raise bad_request(f"this request may use {cost} tokens (prompt + n × max_tokens); this API key's "
                              f"token budget holds at most {burst:g}", field_name)
        await self._spend(key, "tokens", float(cost), model)

    async def _spend(self, key: str, kind: str, cost: float, model: str) -> None:
        limits = self._limits[key]
        try:
            allowed, retry_after = await asyncio.to_thread(
                self._store.allow, f"{kind}:{key}", cost, getattr(limits, f"{kind}_per_s"), limits.burst(kind))
        except Exception:  # the limiter is down: serve rather than refuse everything
            now = time.monotonic()
            if now - self._last_store_warning > 10:
                self._last_store_warning = now
                logger.warning("rate limiter unavailable; letting requests through", exc_info=True)
            return
        if not allowed:
            metrics.REJECTED.labels(model, f"rate_limit_{kind}").inc()
            raise rate_limited(f"rate limit reached for this API key ({getattr(limits, f'{kind}_per_s'):g} "
                               f"{kind}/s); retry after {retry_after:.2f} s", retry_after)


def bearer_from_metadata(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The `authorization` value of gRPC invocation metadata, if any."""
    for name, value in metadata or ():
        if name == "authorization":
            return value.decode() if isinstance(value, bytes) else value
    return None

