"""BlockPool: the fixed set of KV blocks, their ref counts, the free LRU queue and the prefix-cache map.

A freed block keeps its content hash and stays findable until it is handed out again, so a later
request with the same prefix can take it back (lazy eviction). Free blocks are reused oldest-freed
first, which makes eviction LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(eq=False)  # identity semantics: two blocks are never "equal" just because their fields match
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set only while the block is registered in the prefix cache

    @property
    def is_free(self) -> bool:
        return self.ref_cnt == 0


class BlockPool:
    """Owns every KVBlock. Callers hold blocks through ref counts and give them back with `free_blocks`."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Ordered oldest-freed first; keyed by id so a prefix hit can pull a block out of the middle in O(1).
        self._free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVBlock] = {}

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

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after new weights). Blocks in use keep their data and refs."""
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
