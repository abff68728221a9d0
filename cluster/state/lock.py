"""A lock with expiry, for leader election (one autoscaler leader among replicas).

The holder renews before the TTL runs out; if it dies the lock expires and another replica takes
over. Renew and release compare the owner inside Lua so a replica whose lock already expired (and
was taken by another) can never extend or delete the new holder's lock.
"""

from __future__ import annotations

from cluster.state.base import StoreBase, ttl_ms

# Acquire is re-entrant for the same owner (and refreshes the TTL) so a leader loop can just call it.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LockMixin(StoreBase):
    def acquire_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        """True if `owner` holds the lock now (newly taken or already its own, TTL refreshed)."""
        return bool(self._script(_ACQUIRE)(keys=[self.keys.lock(name)], args=[owner, ttl_ms(ttl_s)]))

    def renew_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        """Extend the lock only if `owner` still holds it; False means leadership was lost."""
        return bool(self._script(_RENEW)(keys=[self.keys.lock(name)], args=[owner, ttl_ms(ttl_s)]))

    def release_lock(self, name: str, owner: str) -> bool:
        """Delete the lock only if `owner` holds it."""
        return bool(self._script(_RELEASE)(keys=[self.keys.lock(name)], args=[owner]))

    def lock_owner(self, name: str) -> str | None:
        return self.r.get(self.keys.lock(name))
