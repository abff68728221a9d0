"""KVCacheManager and block hashing: allocation, prefix-cache hits, LRU reuse, eviction, no leaks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.kv.hashing import extend_block_hashes, hash_block_tokens
from cluster.kv.manager import KVCacheManager
from cluster.request import Request, SamplingParams

BS = 4


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=8))


def admit(kv: KVCacheManager, request: Request, num_new_tokens: int | None = None) -> int:
    """What the scheduler does for a waiting request: look up hits, allocate, set num_computed_tokens."""
    blocks, num_hit = kv.get_computed_blocks(request)
    n = request.num_tokens - num_hit if num_new_tokens is None else num_new_tokens
    assert kv.allocate_slots(request, n, blocks) is not None
    request.num_computed_tokens = num_hit
    return num_hit


# ---- hashing ----

def test_hash_is_deterministic_and_chained() -> None:
    h = hash_block_tokens(None, [1, 2, 3, 4])
    assert h == hash_block_tokens(None, [1, 2, 3, 4])
    assert isinstance(h, bytes)
    assert h != hash_block_tokens(None, [4, 3, 2, 1])
    child = hash_block_tokens(h, [5, 6, 7, 8])
    assert child == hash_block_tokens(h, [5, 6, 7, 8])
    assert child != hash_block_tokens(None, [5, 6, 7, 8])
    assert child != hash_block_tokens(hash_block_tokens(None, [0, 2, 3, 4]), [5, 6, 7, 8])
    assert hash_block_tokens(None, [2**40]) != hash_block_tokens(None, [0])  # ids wider than 32 bits


def test_hash_is_stable_across_processes() -> None:
    code = "from cluster.kv.hashing import hash_block_tokens as h; print(h(h(None, [1, 2]), [3, 4]).hex())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == hash_block_tokens(hash_block_tokens(None, [1, 2]), [3, 4]).hex()


def test_extend_block_hashes_is_incremental_and_skips_the_partial_block() -> None:
    tokens = list(range(11))
    full = extend_block_hashes([], tokens, BS)
    assert len(full) == 2
    assert full[1] == hash_block_tokens(hash_block_tokens(None, tokens[:4]), tokens[4:8])
    partial = extend_block_hashes([], tokens[:6], BS)
    assert extend_block_hashes(partial, tokens, BS) is partial
    assert partial == full


# ---- allocation ----

def test_allocate_and_free_without_caching() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    req = make_request("a", list(range(10)))
    assert kv.get_computed_blocks(req) == ([], 0)
    new_blocks = kv.allocate_slots(req, 10)
    assert new_blocks is not None and len(new_blocks) == 3
    assert kv.get_block_ids("a") == [b.block_id for b in new_blocks]
    assert kv.num_free_blocks == 5 and kv.usage == pytest.approx(3 / 8)

    req.num_computed_tokens = 10
    req.append_output_token(99)  # 11 tokens: the third block still has room
    assert kv.allocate_slots(req, 1) == []
    req.num_computed_tokens = 11
    req.append_output_token(98)
    req.num_computed_tokens = 12
    req.append_output_token(97)  # the 13th token needs a fourth block
    assert len(kv.allocate_slots(req, 1)) == 1
    assert len(kv.get_block_ids("a")) == 4

    kv.free(req)
    assert kv.get_block_ids("a") == []
    kv.check_no_leaks()


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS, enable_prefix_caching=True)
    a, b = make_request("a", list(range(8))), make_request("b", list(range(100, 108)))
    admit(kv, a)
    assert kv.allocate_slots(b, 8) is None
    assert kv.num_free_blocks == 1 and kv.get_block_ids("b") == []
    assert kv.allocate_slots(b, 4) is not None  # a smaller chunk does fit
    kv.free(a)
    kv.free(b)
    kv.check_no_leaks()


# ---- prefix caching ----

def test_shared_prefix_hits_and_shares_blocks() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(10)))
    assert admit(kv, a) == 0
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10, 0)

    b = make_request("b", list(range(8)) + [50, 51, 52])
    assert admit(kv, b) == 8
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (21, 8)
    assert kv.get_block_ids("b")[:2] == kv.get_block_ids("a")[:2]
    assert kv.get_block_ids("b")[2] != kv.get_block_ids("a")[2]
    assert kv.num_used_blocks == 4  # two shared, one private each

    kv.free(a)
    assert kv.num_used_blocks == 3  # the shared blocks live on with b
    kv.free(b)
    kv.check_no_leaks()


def test_full_hit_leaves_the_last_block_to_compute() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(8)))
    admit(kv, a)
    b = make_request("b", list(range(8)))
    blocks, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 4 and len(blocks) == 1
    kv.free(a)
    kv.free(b)
    kv.check_no_leaks()


def test_get_computed_blocks_takes_no_references() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    kv.free(a)
    blocks, _ = kv.get_computed_blocks(make_request("b", list(range(9))))
    assert len(blocks) == 2 and all(blk.ref_cnt == 0 for blk in blocks)
    assert kv.num_free_blocks == 4
    kv.free(make_request("b", [0]))  # forget b's hash chain, as the scheduler does on abort
    kv.check_no_leaks()


def test_freed_cached_blocks_are_reused_before_eviction() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 4

    b = make_request("b", list(range(9)))
    assert admit(kv, b) == 8  # the freed blocks were still there
    assert kv.num_free_blocks == 1  # two revived from the free queue, one new
    kv.free(b)
    kv.check_no_leaks()


def test_hits_on_free_blocks_count_against_capacity() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    kv.free(a)  # 4 free, 2 of them cached
    b = make_request("b", list(range(8)) + list(range(50, 59)))  # 2 hits + 9 new tokens = 3 new blocks
    blocks, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    assert kv.allocate_slots(b, 9, blocks) is None
    assert kv.num_free_blocks == 4 and all(blk.ref_cnt == 0 for blk in blocks)
    kv.free(b)
    kv.check_no_leaks()


def test_lru_evicts_the_oldest_freed_and_a_sequence_tail_first() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(8)))  # two full blocks, both cached
    admit(kv, a, num_new_tokens=8)
    kv.free(a)  # freed tail first: a's second block is now older in the LRU than its first
    c = make_request("c", list(range(100, 112)))  # three blocks: the two never used, then a's tail
    admit(kv, c)
    kv.free(c)

    b = make_request("b", list(range(8)) + [7])
    assert admit(kv, b) == 4  # a's head block survived, its tail was evicted
    kv.free(b)
    kv.check_no_leaks()


def test_eviction_when_the_pool_is_full() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    kv.free(a)
    c = make_request("c", list(range(100, 112)))
    admit(kv, c)  # takes every block, evicting a's cached content
    kv.free(c)
    b = make_request("b", list(range(9)))
    assert admit(kv, b) == 0
    kv.free(b)
    kv.check_no_leaks()


def test_blocks_filled_by_decode_are_cached_incrementally() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3, 4, 5, 6])
    admit(kv, a)
    a.num_computed_tokens = 6
    for token in (7, 8, 9):  # decode: the 8th token fills the second block
        a.append_output_token(token)
        assert kv.allocate_slots(a, 1) is not None
        a.num_computed_tokens += 1

    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert admit(kv, b) == 8
    assert kv.get_block_ids("b")[:2] == kv.get_block_ids("a")[:2]
    kv.free(a)
    kv.free(b)
    kv.check_no_leaks()


def test_chunked_prefill_caches_each_chunk_as_it_is_scheduled() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(13)))
    admit(kv, a, num_new_tokens=6)  # first chunk: one full block, one half-filled
    probe = make_request("probe", list(range(13)))
    assert kv.get_computed_blocks(probe)[1] == 4
    a.num_computed_tokens = 6
    assert kv.allocate_slots(a, 6) is not None  # second chunk fills blocks 2 and 3
    assert kv.get_computed_blocks(probe)[1] == 12
    kv.free(a)
    kv.free(probe)  # a looked-up request is tracked (its hash chain) until freed
    kv.check_no_leaks()


def test_reset_prefix_cache() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    kv.free(a)
    kv.reset_prefix_cache()
    b = make_request("b", list(range(9)))
    assert admit(kv, b) == 0
    kv.free(b)
    kv.check_no_leaks()
