"""The store calls worker heartbeats and `pdserve status` add: a snapshot replacing a worker's prefix-index
entries, indexed blocks per worker in one trip, and the (model, pool) pairs routers queue for."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster.kv.hashing import prompt_block_hashes
from cluster.state import EmbeddedRedis, StateStore, WorkerInfo, start_embedded_redis


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = start_embedded_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.close()


@pytest.fixture
def store(embedded: EmbeddedRedis) -> Iterator[StateStore]:
    s = StateStore.from_url(embedded.url, timeout_s=5.0)
    s.r.flushdb()
    yield s
    s.close()


def test_replace_blocks_swaps_the_whole_set_and_follows_the_worker_ttl(store: StateStore) -> None:
    old, new = prompt_block_hashes(list(range(64)), 16), prompt_block_hashes(list(range(100, 132)), 16)
    assert store.replace_blocks("w", new) is None  # not registered: refused, nothing written
    assert store.num_blocks("w") == 0
    store.register(WorkerInfo("w", "m", "decode", "h:1"), ttl_s=30)
    assert store.add_blocks("w", old) == 4
    assert store.replace_blocks("w", new) == 2
    assert store.longest_prefix(old, ["w"]) == {"w": 0}
    assert store.longest_prefix(new, ["w"]) == {"w": 2}
    assert 0 < store.r.pttl(store.keys.blocks("w")) <= 30_000  # expires with the worker, never persists
    assert store.replace_blocks("w", []) == 0
    assert store.num_blocks("w") == 0


def test_num_blocks_by_worker_and_queue_pools(store: StateStore) -> None:
    for wid in ("a", "b"):
        store.register(WorkerInfo(wid, "m", "decode", "h:1"))
    store.add_blocks("a", prompt_block_hashes(list(range(48)), 16))
    assert store.num_blocks_by_worker(["a", "b", "gone"]) == {"a": 3, "b": 0, "gone": 0}
    assert store.num_blocks_by_worker([]) == {}

    assert store.queue_pools() == []
    store.set_queue_depth("org:model", "decode", "r1", 3)  # ':' in a name must survive the key escaping
    store.set_queue_depth("m", "prefill", "r2", 0)
    assert store.queue_pools() == [("m", "prefill"), ("org:model", "decode")]
    assert store.queue_depth("org:model", "decode") == 3
