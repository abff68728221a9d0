"""Token-bucket rate limit per API key, shared by every router replica.

The bucket (tokens, last refill time) is a Redis hash updated by one Lua script, so concurrent
routers cannot both spend the last token. Time comes from the Redis server's clock (TIME), not the
routers', so clock skew between replicas cannot mint tokens.
"""

from __future__ import annotations

import math

from cluster.state.base import StoreBase

# ARGV: rate_per_s, burst, cost. Returns {allowed, retry_after_s as string (Lua numbers returned to
# Redis are truncated to integers)}; retry_after -1 means "never" (cost exceeds the burst).
_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(s[1]) or burst
local ts = tonumber(s[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local retry = 0
if cost > burst then
  retry = -1
elseif tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.6f', now))
-- A full bucket is the same as no bucket: let idle keys vanish once they would have refilled.
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, string.format('%.6f', retry)}
"""


class RateLimitMixin(StoreBase):
    def allow(self, key: str, cost: float, rate_per_s: float, burst: float) -> tuple[bool, float]:
        """Spend `cost` tokens from `key`'s bucket (refilling at `rate_per_s`, holding at most `burst`).

        Returns (allowed, retry_after_s): when refused nothing is spent and retry_after_s is when
        enough tokens will have accumulated (math.inf if `cost` exceeds `burst`).
        """
        if rate_per_s <= 0 or burst <= 0 or cost < 0:
            raise ValueError(f"need rate_per_s > 0, burst > 0, cost >= 0; got {rate_per_s}, {burst}, {cost}")
        allowed, retry = self._script(_TOKEN_BUCKET)(keys=[self.keys.rate(key)], args=[rate_per_s, burst, cost])
        retry_s = float(retry)
        return bool(allowed), (math.inf if retry_s < 0 else retry_s)
