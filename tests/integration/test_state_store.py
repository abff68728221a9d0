"""StateStore against a real embedded redis-server: registry, loads, prefix index, queue depths,
rate limits and locks, including the TTL paths. Timing assertions are bounds that hold on a slow,
shared machine, never exact durations."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from cluster.kv.hashing import extend_block_hashes
from cluster.state import EmbeddedRedis, LoadReport, StateStore, WorkerInfo, start_embedded_redis


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = start_embedded_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.close()


@pytest.fixture
def store(embedded: EmbeddedRedis) -> Iterator[StateStore]:
    s = StateStore.from_url(embedded.url)
    s.r.flushdb()  # clean keys between tests
    yield s
    s.close()


@pytest.fixture
def other(embedded: EmbeddedRedis) -> Iterator[StateStore]:
    """A second client (another router replica) on the same Redis."""
    s = StateStore.from_url(embedded.url)
    yield s
    s.close()


def worker(wid: str, model: str = "tiny", role: str = "decode", port: int = 5000) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, model=model, role=role, address=f"127.0.0.1:{port}", tp=1)


def wait_until(pred, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# --- registry ----------------------------------------------------------------------------------

def test_register_list_filter_models(store: StateStore) -> None:
    store.register(worker("p0", role="prefill"))
    store.register(worker("d0", role="decode"))
    store.register(worker("u0", model="big", role="unified"))
    assert [w.worker_id for w in store.list_workers()] == ["d0", "p0", "u0"]
    assert [w.worker_id for w in store.list_workers(model="tiny", role="prefill")] == ["p0"]
    assert store.list_workers(model="nope") == []
    assert store.models() == ["big", "tiny"]
    got = store.get_worker("p0")
    assert got is not None and got.address == "127.0.0.1:5000" and got.role == "prefill"
    store.deregister("p0")
    assert [w.worker_id for w in store.list_workers()] == ["d0", "u0"]
    assert store.get_worker("p0") is None


def test_registry_ttl_expiry_and_heartbeat(store: StateStore) -> None:
    store.register(worker("alive"), ttl_s=1.0)
    store.register(worker("dying"), ttl_s=1.0)
    # Keep one heartbeating; the other must leave the rotation after its TTL.
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:
        assert store.heartbeat("alive", ttl_s=1.0)
        time.sleep(0.2)
    assert wait_until(lambda: [w.worker_id for w in store.list_workers()] == ["alive"])
    assert store.heartbeat("dying", ttl_s=1.0) is False  # expired: it must register again
    assert store.models() == ["tiny"]


# --- loads -------------------------------------------------------------------------------------

def test_loads_round_trip(store: StateStore) -> None:
    a = LoadReport(num_running=3, num_waiting=1, num_waiting_for_kv=2, num_free_blocks=90,
                   num_total_blocks=128, kv_usage=0.296875)
    b = LoadReport(0, 0, 0, 128, 128, 0.0)
    store.publish_load("w1", a)
    store.publish_load("w2", b)
    assert store.get_loads(["w1", "w2", "missing"]) == {"w1": a, "w2": b}
    assert store.get_loads([]) == {}


def test_load_expires(store: StateStore) -> None:
    store.publish_load("w1", LoadReport(1, 0, 0, 1, 2, 0.5), ttl_s=0.3)
    assert wait_until(lambda: store.get_loads(["w1"]) == {})


# --- prefix index ------------------------------------------------------------------------------

def hashes_for(tokens: list[int], block_size: int = 4) -> list[bytes]:
    return extend_block_hashes([], tokens, block_size)


def test_longest_prefix_full_partial_missing(store: StateStore) -> None:
    for wid in ("full", "partial", "gap", "empty"):
        store.register(worker(wid))
    h = hashes_for(list(range(40)))  # 10 chained blocks
    assert len(h) == 10 and all(isinstance(x, bytes) and len(x) == 16 for x in h)
    assert store.add_blocks("full", h) == 10
    assert store.add_blocks("partial", h[:3]) == 3
    assert store.add_blocks("gap", h[:2] + h[3:]) == 9  # block 2 evicted: counting stops there
    got = store.longest_prefix(h, ["full", "partial", "gap", "empty", "unregistered"])
    assert got == {"full": 10, "partial": 3, "gap": 2, "empty": 0, "unregistered": 0}
    # A different prompt sharing the first 8 tokens (2 blocks) then diverging.
    other = hashes_for(list(range(8)) + [999] * 32)
    assert store.longest_prefix(other, ["full", "partial"]) == {"full": 2, "partial": 2}
    assert store.longest_prefix([], ["full"]) == {"full": 0}
    assert store.longest_prefix(h, []) == {}


def test_remove_blocks_and_reregister_clears(store: StateStore) -> None:
    store.register(worker("w"))
    h = hashes_for(list(range(24)))
    store.add_blocks("w", h)
    assert store.add_blocks("w", h[:2]) == 0  # already indexed
    assert store.remove_blocks("w", [h[1]]) == 1
    assert store.longest_prefix(h, ["w"]) == {"w": 1}
    store.register(worker("w"))  # a restart has an empty cache
    assert store.longest_prefix(h, ["w"]) == {"w": 0}
    assert store.num_blocks("w") == 0


def test_prefix_entries_expire_with_worker(store: StateStore) -> None:
    assert store.add_blocks("ghost", hashes_for(list(range(8)))) is None  # not registered: refused
    store.register(worker("w"), ttl_s=0.5)
    h = hashes_for(list(range(8)))
    store.add_blocks("w", h)
    assert store.longest_prefix(h, ["w"]) == {"w": 2}
    assert wait_until(lambda: store.longest_prefix(h, ["w"]) == {"w": 0})
    assert store.num_blocks("w") == 0


def test_add_many_blocks_in_chunks(store: StateStore) -> None:
    store.register(worker("w"))
    h = hashes_for(list(range(4 * 9000)))  # more than Lua's unpack() limit in one call
    assert store.add_blocks("w", h) == 9000
    assert store.longest_prefix(h, ["w"]) == {"w": 9000}


# --- queue depth -------------------------------------------------------------------------------

def test_queue_depth_summed_across_routers_and_expires(store: StateStore, other: StateStore) -> None:
    store.set_queue_depth("tiny", "prefill", "router-a", 3, ttl_s=0.5)
    other.set_queue_depth("tiny", "prefill", "router-b", 4, ttl_s=30)
    other.set_queue_depth("tiny", "decode", "router-b", 7, ttl_s=30)
    assert store.queue_depth("tiny", "prefill") == 7
    assert other.queue_depths("tiny", "prefill") == {"router-a": 3, "router-b": 4}
    assert store.queue_depth("tiny", "decode") == 7
    assert store.queue_depth("other-model", "prefill") == 0
    store.set_queue_depth("tiny", "prefill", "router-a", 1, ttl_s=0.5)  # overwrite, not add
    assert store.queue_depth("tiny", "prefill") == 5
    # router-a stops reporting: only router-b's depth remains.
    assert wait_until(lambda: store.queue_depth("tiny", "prefill") == 4)


# --- rate limit --------------------------------------------------------------------------------

def test_token_bucket_burst_refuse_refill(store: StateStore, other: StateStore) -> None:
    rate, burst = 5.0, 3
    # Two router replicas share the bucket: the burst is spent across both.
    results = [s.allow("key-1", 1, rate, burst) for s in (store, other, store)]
    assert all(ok for ok, _ in results)
    ok, retry = other.allow("key-1", 1, rate, burst)
    assert not ok
    assert 0 < retry <= 1 / rate + 1e-6  # at most one token's refill time
    ok2, retry2 = store.allow("key-1", 2, rate, burst)
    assert not ok2 and retry2 > retry  # a bigger cost waits longer
    # Another key has its own bucket.
    assert store.allow("key-2", 1, rate, burst)[0]
    # Refill: after waiting the advertised time (plus slack) a request passes again.
    time.sleep(retry + 0.05)
    assert wait_until(lambda: store.allow("key-1", 1, rate, burst)[0], timeout_s=2.0)


def test_token_bucket_cost_above_burst_and_validation(store: StateStore) -> None:
    ok, retry = store.allow("k", 10, 1.0, 5)
    assert not ok and retry == float("inf")
    with pytest.raises(ValueError):
        store.allow("k", 1, 0.0, 5)


def test_token_bucket_is_atomic_under_concurrency(embedded: EmbeddedRedis, store: StateStore) -> None:
    stores = [StateStore.from_url(embedded.url) for _ in range(4)]
    allowed: list[bool] = []
    lock = threading.Lock()

    def spend(s: StateStore) -> None:
        for _ in range(10):
            ok, _ = s.allow("shared", 1, 0.001, 10)  # negligible refill during the test
            with lock:
                allowed.append(ok)

    threads = [threading.Thread(target=spend, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert sum(allowed) == 10 and len(allowed) == 40


def test_api_key_not_stored_in_clear(store: StateStore) -> None:
    store.allow("sk-secret", 1, 1.0, 1)
    assert not any("sk-secret" in k for k in store.r.keys("*"))


# --- lock --------------------------------------------------------------------------------------

def test_lock_exclusive_owner_only_release_and_expiry(store: StateStore, other: StateStore) -> None:
    assert store.acquire_lock("autoscaler", "a", ttl_s=0.5)
    assert not other.acquire_lock("autoscaler", "b", ttl_s=0.5)
    assert store.acquire_lock("autoscaler", "a", ttl_s=0.5)  # re-entrant for the holder
    assert other.lock_owner("autoscaler") == "a"
    assert not other.release_lock("autoscaler", "b")  # not the owner
    assert not other.renew_lock("autoscaler", "b", ttl_s=10)
    assert store.renew_lock("autoscaler", "a", ttl_s=0.5)
    # a stops renewing: the lock expires and b can take it.
    assert wait_until(lambda: other.acquire_lock("autoscaler", "b", ttl_s=10))
    assert not store.renew_lock("autoscaler", "a", ttl_s=10)  # leadership lost
    assert not store.release_lock("autoscaler", "a")  # cannot delete b's lock
    assert other.lock_owner("autoscaler") == "b"
    assert other.release_lock("autoscaler", "b")
    assert store.lock_owner("autoscaler") is None
    assert store.acquire_lock("autoscaler", "a", ttl_s=1)


# --- sharing and prefixes ----------------------------------------------------------------------

def test_two_clients_share_state(store: StateStore, other: StateStore) -> None:
    store.register(worker("d0"))
    store.publish_load("d0", LoadReport(1, 2, 0, 10, 20, 0.5))
    store.add_blocks("d0", hashes_for(list(range(8))))
    assert [w.worker_id for w in other.list_workers()] == ["d0"]
    assert other.get_loads(["d0"])["d0"].num_waiting == 2
    assert other.longest_prefix(hashes_for(list(range(8))), ["d0"]) == {"d0": 2}
    other.deregister("d0")
    assert store.list_workers() == []


def test_prefixes_isolate_clusters(embedded: EmbeddedRedis, store: StateStore) -> None:
    a = StateStore.from_url(embedded.url, prefix="clusterA:")
    b = StateStore.from_url(embedded.url, prefix="clusterB:")
    try:
        a.register(worker("w", model="a-model"))
        b.register(worker("w", model="b-model"))
        b.set_queue_depth("m", "decode", "r", 2)
        assert a.models() == ["a-model"] and b.models() == ["b-model"]
        assert a.queue_depth("m", "decode") == 0
        assert all(k.startswith(("clusterA:", "clusterB:")) for k in store.r.keys("*"))
        assert a.clear() >= 2
        assert a.models() == [] and b.models() == ["b-model"]
    finally:
        a.close()
        b.close()


def test_nothing_pickled(store: StateStore) -> None:
    store.register(worker("w"))
    store.publish_load("w", LoadReport(1, 2, 3, 4, 5, 0.2))
    raw = store.r.get(store.keys.worker("w"))
    assert raw.startswith("{") and '"role": "decode"' in raw
    assert store.r.get(store.keys.load("w")).startswith("{")
