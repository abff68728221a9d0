"""What every part of the state store shares: the client, the key names, and cached Lua scripts."""

from __future__ import annotations

from dataclasses import fields

import redis
from redis.commands.core import Script

from cluster.state.keys import Keys

# Liveness TTL for workers, loads and queue-depth reports: a few missed heartbeats, not one.
DEFAULT_TTL_S = 10.0


def ttl_ms(ttl_s: float) -> int:
    """Redis PX argument; sub-millisecond or non-positive TTLs are caller bugs, not 'expire now'."""
    ms = int(round(ttl_s * 1000))
    if ms < 1:
        raise ValueError(f"ttl_s must be >= 0.001, got {ttl_s}")
    return ms


def known_fields(cls: type, record: dict) -> dict:
    """Drop the fields this version doesn't know, so a newer worker's record never breaks an older
    router (missing ones take their defaults) and the two can be upgraded one at a time."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in record.items() if k in names}


class StoreBase:
    """Mixin base: the parts (registry, load, prefix index, ...) only use `r`, `keys` and `_script`."""

    r: redis.Redis
    keys: Keys
    _scripts: dict[str, Script]

    def _script(self, source: str) -> Script:
        # register_script runs EVALSHA and falls back to EVAL after a server restart (NOSCRIPT).
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.r.register_script(source)
        return script
