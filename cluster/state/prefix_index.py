"""Prefix-cache index: which workers hold which KV blocks, keyed by chained block hash.

One Redis set per worker holds the raw 16-byte hashes from `cluster/kv/hashing.py`. Per-worker sets
(rather than one set of workers per hash) let the entries expire with the worker as one key, and
make a worker restart a single DEL. Because hashes are chained, block i cached means the prefix
through block i matches; `longest_prefix` counts leading hits per worker server-side in one Lua call
and stops at each worker's first miss.
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.state.base import StoreBase

# Lua's unpack() is limited by the C stack (LUAI_MAXCSTACK = 8000): add in chunks below that.
_ADD = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return -1 end
local n = 0
for i = 1, #ARGV, 4000 do
  n = n + redis.call('SADD', KEYS[2], unpack(ARGV, i, math.min(i + 3999, #ARGV)))
end
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) else redis.call('PERSIST', KEYS[2]) end
return n
"""

# Like _ADD, but the set is rebuilt from scratch: a worker's full snapshot after it re-registered,
# reset its cache, or lost track of its changes.
_REPLACE = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return -1 end
redis.call('DEL', KEYS[2])
local n = 0
for i = 1, #ARGV, 4000 do
  n = n + redis.call('SADD', KEYS[2], unpack(ARGV, i, math.min(i + 3999, #ARGV)))
end
if n > 0 then
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) else redis.call('PERSIST', KEYS[2]) end
end
return n
"""

_LONGEST = """
local out = {}
for k = 1, #KEYS do
  local n = 0
  if redis.call('EXISTS', KEYS[k]) == 1 then
    for i = 1, #ARGV do
      if redis.call('SISMEMBER', KEYS[k], ARGV[i]) == 0 then break end
      n = i
    end
  end
  out[k] = n
end
return out
"""


class PrefixIndexMixin(StoreBase):
    def add_blocks(self, worker_id: str, hashes: Sequence[bytes]) -> int | None:
        """Record blocks now cached on `worker_id`; returns how many were new, or None when the worker
        is not registered (entries for a dead worker would outlive it, so they are refused: the
        worker should `register` again)."""
        if not hashes:
            return 0
        k = self.keys
        added = self._script(_ADD)(keys=[k.worker(worker_id), k.blocks(worker_id)], args=list(hashes))
        return None if added < 0 else int(added)

    def replace_blocks(self, worker_id: str, hashes: Sequence[bytes]) -> int | None:
        """Make `hashes` the whole of `worker_id`'s entries, atomically; returns how many, or None when
        the worker is not registered (as `add_blocks`)."""
        k = self.keys
        n = self._script(_REPLACE)(keys=[k.worker(worker_id), k.blocks(worker_id)], args=list(hashes))
        return None if n < 0 else int(n)

    def remove_blocks(self, worker_id: str, hashes: Sequence[bytes]) -> int:
        """Forget evicted blocks; returns how many were indexed."""
        if not hashes:
            return 0
        return int(self.r.srem(self.keys.blocks(worker_id), *hashes))

    def num_blocks(self, worker_id: str) -> int:
        return int(self.r.scard(self.keys.blocks(worker_id)))

    def num_blocks_by_worker(self, worker_ids: Sequence[str]) -> dict[str, int]:
        """Indexed blocks per worker, in one round trip."""
        with self.r.pipeline(transaction=False) as p:
            for w in worker_ids:
                p.scard(self.keys.blocks(w))
            counts = p.execute()
        return {w: int(n) for w, n in zip(worker_ids, counts, strict=True)}

    def longest_prefix(self, hashes: Sequence[bytes], candidate_worker_ids: Sequence[str]) -> dict[str, int]:
        """For each candidate, how many leading blocks of `hashes` it has cached (0 when none)."""
        if not candidate_worker_ids:
            return {}
        if not hashes:
            return {w: 0 for w in candidate_worker_ids}
        keys = [self.keys.blocks(w) for w in candidate_worker_ids]
        counts = self._script(_LONGEST)(keys=keys, args=list(hashes))
        return {w: int(n) for w, n in zip(candidate_worker_ids, counts, strict=True)}
