"""Acceptance 1 of the autoscaler, end to end: the controller (leader lock, decisions, events) driving the
Ray actuator over real Ray actors (simulated prefill and decode workers with a capacity and a queue), a
real embedded Redis and the real router in this process, under closed-loop clients.

Long prompts with short outputs make the prefill pool grow while the decode pool stays; short prompts
with long outputs do the opposite; when the load stops both pools shrink back to their minimum; and
across the whole run every request sent completes (none fails). Delays are seconds, not minutes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from cluster.autoscale.controller import Controller
from cluster.autoscale.events import read_events
from cluster.autoscale.policy import AutoscalePolicy
from cluster.autoscale.ray_actuator import RayActuator
from cluster.autoscale.replicas import simulated_factory
from cluster.metrics import REGISTRY
from cluster.model.tokenizer import Tokenizer
from cluster.request import SamplingParams
from cluster.router.core import Router
from cluster.router.dispatch import ModelPool
from cluster.router.textgen import text_events
from cluster.state import StateStore, start_embedded_redis

MODEL, VOCAB = "poolsim", 2048
# Prefill: one prompt at a time per replica, 0.5 ms a prompt token. Decode: 8 streams at once per replica.
PREFILL_SIM = {"ttft_s": 0.005, "prefill_s_per_token": 0.0005, "itl_s": 0.02, "vocab_size": VOCAB}
DECODE_SIM = {"ttft_s": 0.02, "itl_s": 0.02, "vocab_size": VOCAB}
PREFILL_CAPACITY, DECODE_CAPACITY = 1, 8
POLICY = {
    "leader_lock_ttl_s": 15.0,  # renewed every tick; long enough that a starved tick never loses it
    "defaults": {"min_replicas": 1, "max_replicas": 3, "target_queue_depth": 2, "upscale_delay_s": 1.5,
                 "downscale_delay_s": 2.0, "decision_interval_s": 0.25},
    "pools": [{"model": MODEL, "pool": "prefill"}, {"model": MODEL, "pool": "decode"}],
}


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    server = start_embedded_redis(tmp_path / "redis")
    yield server.url
    server.close()


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    failed: list[str] = field(default_factory=list)


class Load:
    """Closed-loop clients sending one request shape until stopped."""

    def __init__(self, router: Router, tally: Tally, name: str, num_clients: int, prompt_len: int,
                 max_tokens: int) -> None:
        self.stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self._client(router, tally, f"{name}{c}", prompt_len, max_tokens))
                      for c in range(num_clients)]

    async def _client(self, router: Router, tally: Tally, name: str, prompt_len: int, max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        n = 0
        while not self.stop.is_set():
            n += 1
            prompt = [(n * 7 + i) % (VOCAB - 1) + 1 for i in range(prompt_len)]
            tally.sent += 1
            try:
                route = router.resolve(MODEL, prompt=prompt, max_tokens=max_tokens)
                tokens, finish = [], None
                async for _, ids, reason, _ in text_events(route, f"{name}-{n}", route.prompt_ids, params):
                    tokens += ids
                    finish = reason or finish
                if finish == "length" and len(tokens) == max_tokens:
                    tally.completed += 1
                else:
                    tally.failed.append(f"{name}-{n}: {finish} after {len(tokens)} tokens")
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                tally.failed.append(f"{name}-{n}: {exc!r}")

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


def test_each_pool_grows_under_its_own_load_and_shrinks_after_it(ray_cluster, redis_url, tiny_model_dir):
    store = StateStore.from_url(redis_url)
    factories = {
        (MODEL, "prefill"): simulated_factory(MODEL, "prefill", PREFILL_SIM, PREFILL_CAPACITY, redis_url=redis_url,
                                              registry_ttl_s=6.0),
        (MODEL, "decode"): simulated_factory(MODEL, "decode", DECODE_SIM, DECODE_CAPACITY, redis_url=redis_url,
                                             registry_ttl_s=6.0),
    }
    actuator = RayActuator(factories, store=store, poll_s=0.1)
    controller = Controller(store, actuator, AutoscalePolicy.from_dict(POLICY), controller_id="leader")
    standby = Controller(store, actuator, AutoscalePolicy.from_dict(POLICY), controller_id="standby")
    tally = Tally()
    seen: dict[str, list[int]] = {"prefill": [], "decode": []}

    def count(pool: str) -> int:
        return len(store.list_workers(MODEL, pool))

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            for pool in seen:
                seen[pool].append(await asyncio.to_thread(count, pool))
            await asyncio.sleep(0.1)

    async def until(predicate, what: str, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(predicate):
            assert time.monotonic() < deadline, f"timed out waiting for {what}; replicas seen {seen}"
            await asyncio.sleep(0.1)

    def routed(pool: str, worker_id: str) -> float:
        labels = {"model": MODEL, "pool": pool, "worker": worker_id}
        return REGISTRY.get_sample_value("pdserve:requests_routed_total", labels) or 0.0

    def a_new_replica_served(pool: str, first: set[str]) -> bool:
        return any(routed(pool, w.worker_id) for w in store.list_workers(MODEL, pool) if w.worker_id not in first)

    async def phase(name: str, grows: str, stays: str, num_clients: int, prompt_len: int, max_tokens: int) -> None:
        first = {w.worker_id for w in store.list_workers(MODEL, grows)}
        for pool in seen:
            seen[pool].clear()
        load = Load(router, tally, name, num_clients, prompt_len, max_tokens)
        await until(lambda: count(grows) >= 2, f"the {grows} pool to grow")
        await until(lambda: a_new_replica_served(grows, first), f"a new {grows} replica to serve")
        await load.finish()
        assert max(seen[stays]) == 1, f"the {stays} pool moved under a load for {grows}: {seen[stays]}"
        await until(lambda: count("prefill") == 1 and count("decode") == 1
                     and actuator.num_replicas(MODEL, "prefill") == 1 and actuator.num_replicas(MODEL, "decode") == 1,
                     "both pools to shrink to their minimum")

    async def body() -> None:
        nonlocal router
        controller.start()
        await until(lambda: controller.is_leader, "the first controller to lead")
        standby.start()  # waits: one leader per cluster
        await until(lambda: count("prefill") == 1 and count("decode") == 1, "the pools' first replicas")
        pool = ModelPool(MODEL, Tokenizer.from_dir(tiny_model_dir), 4096)
        router = Router.from_config({MODEL: pool}, {"poll_interval_s": 0.1}, redis_url=redis_url)
        await router.start()
        stop_watch = asyncio.Event()
        watcher = asyncio.create_task(watch(stop_watch))
        try:
            # Long prompts (400 tokens: 0.2 s of prefill each), short outputs: prefill is the bottleneck
            # (8 prompts on one running plus 2 waiting per replica: 3 replicas); 8 streams fit one decode replica.
            await phase("long-prompt", grows="prefill", stays="decode", num_clients=8, prompt_len=400, max_tokens=4)
            # Short prompts (9 ms of prefill), long outputs (2 s streams): decode capacity is the bottleneck
            # (20 streams on 8 running plus 2 waiting per replica: 2 replicas), prefill is 10 % busy.
            await phase("long-output", grows="decode", stays="prefill", num_clients=20, prompt_len=8, max_tokens=100)
        finally:
            stop_watch.set()
            await watcher
            await router.close()

    router = None
    try:
        asyncio.run(body())
    finally:
        standby.stop()  # first: it would take over the lock the leader hands back
        controller.stop()
        actuator.close()
    try:
        assert tally.failed == [] and tally.sent == tally.completed > 0
        assert controller.num_ticks > 0 and not standby.is_leader and standby.num_failed_ticks == 0
        assert {e.controller for e in read_events(store, limit=1000)} == {"leader"}
        ups = [(e.pool, e.reason) for e in read_events(store, limit=1000) if e.direction == "up"]
        assert ("prefill", "load") in ups and ("decode", "load") in ups
        downs = {e.pool for e in read_events(store, limit=1000) if e.direction == "down"}
        assert downs == {"prefill", "decode"}
    finally:
        store.close()
