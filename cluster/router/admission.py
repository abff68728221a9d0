"""Admission: a bounded priority queue per model in front of a cap on its requests in flight.

A request here: `acquire(priority)` → a slot is free and nobody waits: it is in flight at once →
else, if `max_queue` requests already wait, 429 with Retry-After (reason `queue_full`) → else it
waits in the queue, lower `priority` first, then arrival → a finishing request's `release()` (or
workers joining, which raises the cap: `pump()`) hands its slot to the head of the queue. A request
whose client goes away while it waits (its task is cancelled, or `is_gone()` turns true) leaves the
queue; one still queued after `queue_timeout_s` gets 429 (reason `queue_timeout`).

The cap is `AdmissionConfig.max_in_flight`, else what the `capacity` callback says (the sum of the
model's decode workers' max_num_seqs); None means no cap, and the queue stays empty.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cluster.metrics import REJECTED
from cluster.router.config import AdmissionConfig
from cluster.router.errors import APIError

IsGone = Callable[[], Awaitable[bool]]
DISCONNECT_POLL_S = 0.5  # how often a queued request checks whether its client is still there


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    future: asyncio.Future = field(compare=False)


class Admission:
    def __init__(self, model: str, config: AdmissionConfig | None = None,
                 capacity: Callable[[], int | None] = lambda: None,
                 on_change: Callable[[Admission], None] | None = None) -> None:
        self.model = model
        self.config = config or AdmissionConfig()
        self._capacity = capacity
        self._on_change = on_change
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self.num_in_flight = 0

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    @property
    def max_in_flight(self) -> int | None:
        return self.config.max_in_flight if self.config.max_in_flight is not None else self._capacity()

    @property
    def has_free_slot(self) -> bool:
        cap = self.max_in_flight
        return cap is None or self.num_in_flight < cap

    @property
    def is_full(self) -> bool:
        """A new request would be refused now."""
        return not (self.has_free_slot and not self._queue) and self.num_queued >= self.config.max_queue

    async def acquire(self, priority: int = 0, is_gone: IsGone | None = None) -> None:
        """Return once the request is in flight (call `release()` when it finishes)."""
        if self.has_free_slot and not self._queue:
            self._take()
            return
        if self.num_queued >= self.config.max_queue:
            raise self._refuse("queue_full", f"the queue for model {self.model!r} is full "
                                             f"({self.num_queued} requests waiting); retry later")
        waiter = _Waiter(priority, next(self._seq), asyncio.get_running_loop().create_future())
        heapq.heappush(self._queue, waiter)
        self._changed()
        try:
            await self._wait(waiter.future, is_gone)
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # the slot arrived as we were leaving: hand it on
            else:
                waiter.future.cancel()
                self._remove(waiter)
            raise

    def release(self) -> None:
        self.num_in_flight -= 1
        self.pump()

    def pump(self) -> None:
        """Hand free slots to the head of the queue (after a release, or when the cap grew)."""
        while self._queue and self.has_free_slot:
            waiter = heapq.heappop(self._queue)
            self._take()
            waiter.future.set_result(None)
        self._changed()

    async def _wait(self, future: asyncio.Future, is_gone: IsGone | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.queue_timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._refuse("queue_timeout", f"no capacity for model {self.model!r} within "
                                                    f"{self.config.queue_timeout_s:g} s; retry later")
            step = remaining if is_gone is None else min(remaining, DISCONNECT_POLL_S)
            done, _ = await asyncio.wait([future], timeout=step)
            if done:
                return
            if is_gone is not None and await is_gone():
                REJECTED.labels(model=self.model, reason="client_gone").inc()
                # 499 (nginx's "client closed request"): nobody reads it, but the handler ends cleanly.
                raise APIError(499, "the client went away while queued", None, "client_closed_request")

    def _take(self) -> None:
        self.num_in_flight += 1
        self._changed()

    def _remove(self, waiter: _Waiter) -> None:
        if waiter in self._queue:
            self._queue.remove(waiter)
            heapq.heapify(self._queue)
        self._changed()

    def _refuse(self, reason: str, message: str) -> APIError:
        REJECTED.labels(model=self.model, reason=reason).inc()
        retry = str(max(1, math.ceil(self.config.retry_after_s)))
        return APIError(429, message, None, "rate_limit_error", {"Retry-After": retry})

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)
