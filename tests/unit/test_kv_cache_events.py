"""The KV manager's prefix-cache events (what heartbeats publish to the cluster's prefix index): hashes
cached and evicted, drained once, bounded with a snapshot fallback, and equal to what a router computes
from token ids with `prompt_block_hashes`."""

from __future__ import annotations

import pytest

from cluster.kv.hashing import prompt_block_hashes
from cluster.kv.manager import KVCacheManager
from cluster.request import Request, SamplingParams

BS = 4


def admit(kv: KVCacheManager, request_id: str, prompt: list[int]) -> Request:
    """What the scheduler does for a waiting prompt: look up hits, allocate the rest, compute it."""
    request = Request(request_id, prompt, SamplingParams(max_tokens=8))
    blocks, num_hit = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_hit, blocks) is not None
    request.num_computed_tokens = request.num_tokens
    return request


def test_cached_blocks_are_the_prompt_block_hashes_and_drain_once() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    prompt = list(range(100, 111))  # two full blocks and a partial one
    request = admit(kv, "a", prompt)
    events = kv.drain_cache_events()
    assert not events.is_snapshot and events.removed == []
    assert events.stored == prompt_block_hashes(prompt, BS) and len(events.stored) == 2
    assert kv.drain_cache_events().stored == []

    # Generated tokens that fill the third block extend the same chain.
    request.append_output_token(7)
    assert kv.allocate_slots(request, 1) == []
    request.num_computed_tokens += 1
    assert kv.drain_cache_events().stored == prompt_block_hashes([*prompt, 7], BS)[2:]
    kv.free(request)
    assert kv.drain_cache_events().stored == []  # freed blocks stay cached: no event
    assert kv.num_cached_blocks == 3


def test_evicted_blocks_are_reported_removed_with_latest_state_winning() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=BS, enable_prefix_caching=True)
    first = list(range(8))
    kv.free(admit(kv, "a", first))
    first_hashes = kv.drain_cache_events().stored
    assert first_hashes == prompt_block_hashes(first, BS)

    second = list(range(50, 58))
    kv.free(admit(kv, "b", second))  # takes both blocks back: the first prompt's hashes are evicted
    events = kv.drain_cache_events()
    assert sorted(events.removed) == sorted(first_hashes)
    assert events.stored == prompt_block_hashes(second, BS)

    # Between two drains the first prompt comes back and goes again, and the second goes and comes
    # back: each hash is reported once, in its latest state.
    kv.free(admit(kv, "c", first))
    kv.free(admit(kv, "d", second))
    events = kv.drain_cache_events()
    assert sorted(events.removed) == sorted(first_hashes)
    assert sorted(events.stored) == sorted(prompt_block_hashes(second, BS))


def test_snapshot_on_request_overflow_and_reset() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=True, max_pending_cache_events=2)
    a = list(range(12))
    kv.free(admit(kv, "a", a))  # three cached blocks: more than two pending events
    events = kv.drain_cache_events()
    assert events.is_snapshot and sorted(events.stored) == sorted(prompt_block_hashes(a, BS))
    assert kv.drain_cache_events() == type(events)()  # nothing since

    b = list(range(20, 24))
    kv.free(admit(kv, "b", b))
    snapshot = kv.drain_cache_events(snapshot=True)
    assert snapshot.is_snapshot
    assert sorted(snapshot.stored) == sorted(prompt_block_hashes(a, BS) + prompt_block_hashes(b, BS))

    kv.reset_prefix_cache()
    events = kv.drain_cache_events()
    assert events.is_snapshot and events.stored == []  # "drop everything", in one message


def test_no_events_without_prefix_caching() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    kv.free(admit(kv, "a", list(range(12))))
    kv.free(admit(kv, "b", list(range(50, 62))))
    events = kv.drain_cache_events()
    assert events.stored == [] and events.removed == [] and kv.num_cached_blocks == 0


def test_prompt_block_hashes_covers_full_blocks_and_names_bad_block_size() -> None:
    tokens = list(range(10))
    assert len(prompt_block_hashes(tokens, 4)) == 2
    assert prompt_block_hashes(tokens[:8], 4) == prompt_block_hashes(tokens, 4)
    assert prompt_block_hashes(tokens, 16) == []
    assert prompt_block_hashes(tokens, 2)[:1] != prompt_block_hashes(tokens, 4)[:1]
    with pytest.raises(ValueError, match="block_size"):
        prompt_block_hashes(tokens, 0)
    with pytest.raises(ValueError, match="max_pending_events"):
        KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=True, max_pending_cache_events=0)
