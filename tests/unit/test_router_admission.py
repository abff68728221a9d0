"""Admission (cluster/router/admission.py): the cap on requests in flight, the bounded priority queue,
429 with Retry-After, and requests leaving the queue when their client goes away."""

from __future__ import annotations

import asyncio

import pytest

from cluster.metrics import REGISTRY
from cluster.router.admission import Admission
from cluster.router.config import AdmissionConfig
from cluster.router.errors import APIError


def run(coro):
    return asyncio.run(coro)


async def settle() -> None:
    for _ in range(5):  # let woken waiters run
        await asyncio.sleep(0)


def rejected(model: str, reason: str) -> float:
    return REGISTRY.get_sample_value("pdserve:requests_rejected_total", {"model": model, "reason": reason}) or 0.0


def test_under_the_cap_requests_go_straight_in_and_without_one_nothing_waits():
    async def body() -> None:
        capped = Admission("m", AdmissionConfig(max_in_flight=2, max_queue=0))
        await capped.acquire()
        await capped.acquire()
        assert (capped.num_in_flight, capped.num_queued, capped.is_full) == (2, 0, True)
        uncapped = Admission("m", AdmissionConfig(max_queue=0))  # no max_in_flight, no capacity known
        for _ in range(100):
            await uncapped.acquire()
        assert uncapped.num_in_flight == 100 and not uncapped.is_full

    run(body())


def test_the_queue_serves_lower_priority_values_first_then_arrival():
    async def body() -> None:
        adm = Admission("m", AdmissionConfig(max_in_flight=1, max_queue=10))
        await adm.acquire()
        order: list[str] = []

        async def request(name: str, priority: int) -> None:
            await adm.acquire(priority)
            order.append(name)

        tasks = []
        for name, priority in [("late-low", 5), ("first-normal", 0), ("urgent", -1), ("second-normal", 0)]:
            tasks.append(asyncio.create_task(request(name, priority)))
            await settle()  # arrival order is creation order
        assert adm.num_queued == 4 and order == []
        for _ in range(4):
            adm.release()
            await settle()
        assert order == ["urgent", "first-normal", "second-normal", "late-low"]
        assert adm.num_in_flight == 1 and adm.num_queued == 0
        await asyncio.gather(*tasks)

    run(body())


def test_a_full_queue_is_429_with_retry_after():
    async def body() -> None:
        adm = Admission("full-model", AdmissionConfig(max_in_flight=1, max_queue=1, retry_after_s=2.5))
        await adm.acquire()
        waiting = asyncio.create_task(adm.acquire())
        await settle()
        before = rejected("full-model", "queue_full")
        with pytest.raises(APIError) as info:
            await adm.acquire()
        assert info.value.status == 429 and info.value.headers["Retry-After"] == "3"
        assert info.value.type == "rate_limit_error" and "full-model" in info.value.message
        assert rejected("full-model", "queue_full") == before + 1
        adm.release()
        await waiting  # the queued one still gets in
        assert adm.num_in_flight == 1

    run(body())


def test_a_request_cancelled_while_queued_leaves_the_queue():
    async def body() -> None:
        adm = Admission("m", AdmissionConfig(max_in_flight=1, max_queue=5))
        await adm.acquire()
        gone = asyncio.create_task(adm.acquire())
        stays = asyncio.create_task(adm.acquire())
        await settle()
        assert adm.num_queued == 2
        gone.cancel()
        await settle()
        assert adm.num_queued == 1
        adm.release()
        await stays  # the slot goes to the one still waiting, not the cancelled one
        assert gone.cancelled() and adm.num_in_flight == 1 and adm.num_queued == 0

    run(body())


def test_a_request_whose_client_disconnects_leaves_the_queue():
    async def body() -> None:
        adm = Admission("gone-model", AdmissionConfig(max_in_flight=1, max_queue=5))
        await adm.acquire()
        client_gone = asyncio.Event()

        async def is_gone() -> bool:
            return client_gone.is_set()

        waiting = asyncio.create_task(adm.acquire(is_gone=is_gone))
        await settle()
        assert adm.num_queued == 1
        client_gone.set()
        with pytest.raises(APIError) as info:
            await waiting
        assert info.value.status == 499 and adm.num_queued == 0 and adm.num_in_flight == 1

    run(body())


def test_a_request_queued_too_long_gets_429():
    async def body() -> None:
        adm = Admission("slow-model", AdmissionConfig(max_in_flight=1, max_queue=5, queue_timeout_s=0.05))
        await adm.acquire()
        with pytest.raises(APIError) as info:
            await adm.acquire()
        assert info.value.status == 429 and "Retry-After" in info.value.headers
        assert adm.num_queued == 0 and rejected("slow-model", "queue_timeout") >= 1

    run(body())


def test_a_larger_capacity_lets_queued_requests_in():
    async def body() -> None:
        capacity = [1]
        adm = Admission("m", AdmissionConfig(max_queue=5), capacity=lambda: capacity[0])
        await adm.acquire()
        waiting = [asyncio.create_task(adm.acquire()) for _ in range(2)]
        await settle()
        assert adm.num_queued == 2
        capacity[0] = 3  # e.g. a worker joined
        adm.pump()
        await asyncio.gather(*waiting)
        assert (adm.num_in_flight, adm.num_queued) == (3, 0)

    run(body())


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_queue": -1}, "max_queue"), ({"max_in_flight": 0}, "max_in_flight"),
    ({"queue_timeout_s": 0}, "queue_timeout_s"), ({"retry_after_s": "soon"}, "retry_after_s"),
])
def test_bad_admission_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        AdmissionConfig(**kwargs)
