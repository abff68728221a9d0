"""BlockPool: the fixed set of KV blocks, their ref counts, the free LRU queue and the prefix-cache map.

A freed block keeps its content hash and stays findable until it is handed out again, so a later
request with the same prefix can take it back (lazy eviction). Free blocks are reused oldest-freed
first, which makes eviction LRU.

The pool also notes which hashes enter and leave the prefix cache, for the cluster's prefix index in
Redis (`cluster/worker/registration.py` drains them with every heartbeat). The note is one dict write
per cached or evicted block on the engine thread; it keeps only each hash's latest state, and is
bounded: past `max_pending_events` it is dropped and the next drain hands out the whole cache instead
(a snapshot), so an unreachable Redis costs bounded memory and the index still converges.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

# ~100 bytes a pending hash: a few MB at most, far more than a heartbeat period's churn.
DEFAULT_MAX_PENDING_EVENTS = 65536


@dataclass(eq=False)  # identity semantics: two blocks are never "equal" just because their fields match
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set only while the block is registered in the prefix cache

    @property
    def is_free(self) -> bool:
        return self.ref_cnt == 0


@dataclass
class CacheEvents:
    """Prefix-cache changes since the last drain: hashes now cached (`stored`) and evicted (`removed`).

    With `is_snapshot`, `stored` is the whole cache and replaces what the index held for this worker
    (after an overflow, a cache reset, or when the caller asked for one)."""

    stored: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)
    is_snapshot: bool = False


class BlockPool:
    """Owns every KVBlock. Callers hold blocks through ref counts and give them back with `free_blocks`."""

    def __init__(self, num_blocks: int, enable_caching: bool,
                 max_pending_events: int = DEFAULT_MAX_PENDING_EVENTS) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if max_pending_events < 1:
            raise ValueError(f"max_pending_events must be >= 1, got {max_pending_events}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Ordered oldest-freed first; keyed by id so a prefix hit can pull a block out of the middle in O(1).
        self._free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVBlock] = {}
        self.max_pending_events = max_pending_events
        self._pending_events: dict[bytes, bool] = {}  # hash -> is cached now (latest state wins)
        self._is_events_overflowed = False

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by some request, in [0, 1]. Free cached blocks count as unused."""
        return self.num_used_blocks / self.num_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Take `num_blocks` from the LRU end of the free queue, evicting their cached content."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, only {self.num_free_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            _, block = self._free_queue.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks found in the prefix cache; free ones leave the free queue."""
        for block in blocks:
            if block.is_free:
                del self._free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop a reference on each block; blocks reaching zero join the free queue's MRU end in order.

        Pass a sequence's blocks tail first: its last blocks are the least likely to be shared, so
        they should be the first evicted.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than it was taken")
            block.ref_cnt -= 1
            if block.is_free:
                self._free_queue[block.block_id] = block

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def cache_full_block(self, block: KVBlock, block_hash: bytes) -> None:
        """Register a block that just became full under its content hash.

        If two requests computed the same content at once, the first block stays the cached one and
        the duplicate remains a plain block, freed without a trace.
        """
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block
        self._note_event(block_hash, True)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after new weights). Blocks in use keep their data and refs."""
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        self._pending_events.clear()
        self._is_events_overflowed = True  # the next drain is an (empty) snapshot: one DEL, not N removes

    def drain_cache_events(self, snapshot: bool = False) -> CacheEvents:
        """Hand out (and forget) the changes since the last drain; a snapshot when asked or overflowed."""
        if snapshot or self._is_events_overflowed:
            events = CacheEvents(stored=list(self._cached), is_snapshot=True)
        else:
            events = CacheEvents(stored=[h for h, is_cached in self._pending_events.items() if is_cached],
                                 removed=[h for h, is_cached in self._pending_events.items() if not is_cached])
        self._pending_events = {}
        self._is_events_overflowed = False
        return events

    def _note_event(self, block_hash: bytes, is_cached: bool) -> None:
        if self._is_events_overflowed:
            return  # a snapshot is due anyway
        self._pending_events[block_hash] = is_cached
        if len(self._pending_events) > self.max_pending_events:
            self._pending_events.clear()
            self._is_events_overflowed = True

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            self._note_event(block.block_hash, False)
            block.block_hash = None
