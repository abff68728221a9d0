"""BlockPool: LRU free queue, ref counts, lazy eviction of cached blocks."""

from __future__ import annotations

import pytest

from cluster.kv.block_pool import BlockPool
from cluster.kv.hashing import hash_block_tokens

H1 = hash_block_tokens(None, [1, 2])
H2 = hash_block_tokens(H1, [3, 4])


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def test_new_blocks_come_from_the_lru_front() -> None:
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    assert ids(blocks) == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.num_free_blocks == 1 and pool.num_used_blocks == 3
    assert pool.usage == pytest.approx(0.75)
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)


def test_freed_blocks_join_the_tail_in_the_order_given() -> None:
    pool = BlockPool(4, enable_caching=True)
    a = pool.get_new_blocks(3)  # 0, 1, 2; block 3 stays free at the front
    pool.free_blocks(reversed(a))
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    # LRU: the never-used block first, then the sequence's tail before its head
    assert ids(pool.get_new_blocks(4)) == [3, 2, 1, 0]


def test_touch_takes_a_free_cached_block_back_out_of_the_queue() -> None:
    pool = BlockPool(3, enable_caching=True)
    [block] = pool.get_new_blocks(1)
    pool.cache_full_block(block, H1)
    pool.free_blocks([block])
    assert pool.num_free_blocks == 3
    assert pool.get_cached_block(H1) is block  # freed but still cached: lazy eviction

    pool.touch([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 2
    assert block.block_id not in ids(pool.get_new_blocks(2))
    pool.touch([block])  # shared by a second holder
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 0


def test_cached_block_is_evicted_only_when_handed_out_again() -> None:
    pool = BlockPool(2, enable_caching=True)
    b0, b1 = pool.get_new_blocks(2)
    pool.cache_full_block(b0, H1)
    pool.cache_full_block(b1, H2)
    pool.free_blocks([b1, b0])
    assert pool.num_cached_blocks == 2

    [reused] = pool.get_new_blocks(1)
    assert reused is b1 and reused.block_hash is None
    assert pool.get_cached_block(H2) is None
    assert pool.get_cached_block(H1) is b0
    assert pool.num_cached_blocks == 1


def test_duplicate_content_keeps_the_first_block_cached() -> None:
    pool = BlockPool(2, enable_caching=True)
    first, dup = pool.get_new_blocks(2)
    pool.cache_full_block(first, H1)
    pool.cache_full_block(dup, H1)
    assert pool.get_cached_block(H1) is first
    assert dup.block_hash is None
    pool.free_blocks([dup, first])
    assert ids(pool.get_new_blocks(1)) == [dup.block_id]
    assert pool.get_cached_block(H1) is first


def test_caching_disabled_never_finds_anything() -> None:
    pool = BlockPool(2, enable_caching=False)
    [block] = pool.get_new_blocks(1)
    pool.cache_full_block(block, H1)
    assert block.block_hash is None
    assert pool.get_cached_block(H1) is None


def test_reset_prefix_cache_forgets_every_hash() -> None:
    pool = BlockPool(2, enable_caching=True)
    b0, b1 = pool.get_new_blocks(2)
    pool.cache_full_block(b0, H1)
    pool.cache_full_block(b1, H2)
    pool.free_blocks([b1])
    pool.reset_prefix_cache()
    assert pool.get_cached_block(H1) is None and pool.get_cached_block(H2) is None
    assert b0.block_hash is None and b0.ref_cnt == 1  # in-use blocks keep their reference
    pool.free_blocks([b0])
    assert pool.num_free_blocks == 2


def test_freeing_an_unreferenced_block_is_an_error() -> None:
    pool = BlockPool(1, enable_caching=True)
    [block] = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(ValueError):
        pool.free_blocks([block])
