"""KVCacheManager: maps each request to the KV blocks it holds, and finds prefix-cache hits.

The scheduler asks two questions per request: "which leading blocks of this sequence are cached
already?" (`get_computed_blocks`) and "can it have room for N more tokens?" (`allocate_slots`, None
meaning no: the scheduler preempts). Blocks are registered in the prefix cache as soon as the
tokens that fill them are scheduled, so any later request can share them. Which hashes enter and
leave the cache is noted for the cluster's prefix index (`drain_cache_events`).
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.kv.block_pool import DEFAULT_MAX_PENDING_EVENTS, BlockPool, CacheEvents, KVBlock
from cluster.kv.hashing import extend_block_hashes
from cluster.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 max_pending_cache_events: int = DEFAULT_MAX_PENDING_EVENTS) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_prefix_caching, max_pending_cache_events)
        self._req_blocks: dict[str, list[KVBlock]] = {}
        # Hash chain of each request's full blocks, by content: grows as tokens arrive, never rehashed.
        self._req_block_hashes: dict[str, list[bytes]] = {}
        # How many of a request's leading blocks have already been offered to the prefix cache.
        self._num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # of those, tokens found cached

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.block_pool.num_used_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable in the prefix cache now (in use or free but not yet reused)."""
        return self.block_pool.num_cached_blocks

    def drain_cache_events(self, snapshot: bool = False) -> CacheEvents:
        """Block hashes cached and evicted since the last drain (the whole cache if `snapshot`, or if
        too many piled up). The hashes are those `prompt_block_hashes` computes from token ids."""
        return self.block_pool.drain_cache_events(snapshot)

    @property
    def num_tracked_requests(self) -> int:
        return len(self._req_blocks.keys() | self._req_block_hashes.keys())

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest run of cached full blocks at the start of the request, and the tokens they cover.

        At least one token is always left out: the model must run on something to produce logits.
        Ref counts are untouched; `allocate_slots` takes the references.
        """
        if not self.enable_prefix_caching:
            return [], 0
        block_hashes = self._block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[KVBlock] = []
        for block_hash in block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        num_hit_tokens = len(blocks) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return blocks, num_hit_tokens

    def count_cached_prefix_tokens(self, token_ids: Sequence[int]) -> int:
        """Tokens of this sequence's leading full blocks that are cached now. Read-only: no counters,
        no tracking — for routing decisions, not admission."""
        if not self.enable_prefix_caching:
            return 0
        num_hit = 0
        for block_hash in extend_block_hashes([], token_ids, self.block_size):
            if self.block_pool.get_cached_block(block_hash) is None:
                break
            num_hit += self.block_size
        return num_hit

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVBlock] = (),
        defer_caching: bool = False,
    ) -> list[KVBlock] | None:
        """Make room for `num_new_tokens` after the request's computed tokens and any new prefix hits.

        Returns the newly allocated blocks (possibly empty: the last block had room), or None when the
        pool can't supply them, in which case nothing changed. With `defer_caching` the new blocks are
        not offered to the prefix cache until `cache_blocks` says their KV is really there (a transfer
        from a prefill worker fills them later, and may fail).
        """
        blocks = self._req_blocks.get(request.request_id, [])
        num_computed_tokens = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_total_tokens = num_computed_tokens + num_new_tokens
        num_new_blocks = cdiv(num_total_tokens, self.block_size) - len(blocks) - len(new_computed_blocks)
        # A hit on a free cached block pulls it out of the free queue, so it competes with new blocks.
        num_hits_on_free = sum(1 for b in new_computed_blocks if b.is_free)
        if num_new_blocks > self.block_pool.num_free_blocks - num_hits_on_free:
            return None

        self._req_blocks[request.request_id] = blocks
        self.block_pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks) if num_new_blocks > 0 else []
        blocks.extend(new_blocks)
        if not defer_caching:
            self._cache_full_blocks(request, blocks, min(num_total_tokens, request.num_tokens))
        return new_blocks

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Offer the prefix cache the full blocks among the request's first `num_tokens` tokens."""
        self._cache_full_blocks(request, self._req_blocks.get(request.request_id, []), num_tokens)

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first so shared prefixes outlive private suffixes."""
        blocks = self._req_blocks.pop(request.request_id, [])
        self.block_pool.free_blocks(reversed(blocks))
        self._req_block_hashes.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._req_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> None:
        self.block_pool.reset_prefix_cache()

    def check_no_leaks(self) -> None:
        """Raise AssertionError unless every block is free, unreferenced and no request is tracked."""
        leaked = [b.block_id for b in self.block_pool.blocks if b.ref_cnt != 0]
        assert not leaked, f"blocks still referenced: {leaked}"
        assert self.num_free_blocks == self.num_blocks, f"{self.num_free_blocks}/{self.num_blocks} free"
        assert self.num_tracked_requests == 0, f"{self.num_tracked_requests} requests still tracked"

    def _block_hashes(self, request: Request) -> list[bytes]:
        hashes = self._req_block_hashes.setdefault(request.request_id, [])
        return extend_block_hashes(hashes, request.all_token_ids, self.block_size)

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_known_tokens: int) -> None:
        """Offer the cache every block that the scheduled tokens fill, continuing the request's hash chain."""
        if not self.enable_prefix_caching:
            return
        num_full_blocks = num_known_tokens // self.block_size
        num_cached = self._num_cached_blocks.get(request.request_id, 0)
        if num_full_blocks <= num_cached:
            return
        block_hashes = self._block_hashes(request)
        for i in range(num_cached, num_full_blocks):
            self.block_pool.cache_full_block(blocks[i], block_hashes[i])
        self._num_cached_blocks[request.request_id] = num_full_blocks
