"""One run: a workload's requests sent by an arrival process through a backend, bounded by a count (the
workload's length) and a duration.

Open loop, request i is sent at its arrival time (loadtest/arrival.py), whatever is still in flight
(under `max_concurrency` when set: it waits for a slot). Closed loop, N users each take the next
request as soon as their last one ends. A multi-turn request first waits for its session's previous
answer (loadtest/sessions.py). No request is sent after the duration; requests still in flight then
get `grace_s` more seconds and are then cut (recorded as cut: neither done nor failed). A request
cut before it was sent is not recorded at all.

The run's duration, for throughput, is from the start to the moment the last request finished or
was cut, as vLLM's benchmark measures it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from loadtest.arrival import Arrival
from loadtest.backends import error_message, error_type
from loadtest.record import RequestRecord
from loadtest.sessions import Conversations
from loadtest.workload import RequestSpec


@dataclass(frozen=True)
class Bounds:
    num_requests: int = 200
    duration_s: float = 600.0
    grace_s: float = 30.0  # after the duration: how long requests in flight may still finish
    timeout_s: float = 600.0  # one request, all of it

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        for name in ("duration_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")


@dataclass
class RunOutcome:
    records: list[RequestRecord]
    duration_s: float
    started_at: float  # time.time() at the start
    client_cpu_s: float  # this process's CPU time over the run: near duration_s, the client set the pace


async def run(specs: list[RequestSpec], arrival: Arrival, backend, conversations: Conversations, bounds: Bounds, *,
              seed: int = 0, progress: bool = True, label: str = "") -> RunOutcome:
    records: list[RequestRecord] = []
    bar = tqdm(total=len(specs), desc=label or "requests", unit="req", disable=not progress, dynamic_ncols=True)
    num_errors = 0
    started_at, run_start, cpu_start = time.time(), time.perf_counter(), time.process_time()
    deadline = run_start + bounds.duration_s
    slots = asyncio.Semaphore(arrival.max_concurrency) if arrival.max_concurrency else None

    async def one(spec: RequestSpec, scheduled: float) -> None:
        nonlocal num_errors
        await conversations.wait_turn(spec)
        if time.perf_counter() >= deadline:
            conversations.record_answer(spec, None)  # never sent: the session's later turns need not wait
            return
        record = RequestRecord(index=spec.index, scheduled=scheduled, max_tokens=spec.max_tokens,
                               session=spec.session, turn=spec.turn if spec.session is not None else None)
        records.append(record)
        try:
            inp = conversations.compose(spec)
            record.num_expected_input_tokens = record.num_input_tokens = inp.num_tokens
            await asyncio.wait_for(backend.send(inp, spec, record, run_start), bounds.timeout_s)
        except asyncio.CancelledError:
            record.is_cut = True
            raise
        except Exception as exc:  # noqa: BLE001 — counted by type; one failure never stops the run
            record.error, record.error_detail = error_type(exc), error_message(exc)[:300]
            num_errors += 1
        finally:
            conversations.record_answer(spec, record.output_text)
            bar.update(1)
            if num_errors:
                bar.set_postfix(errors=num_errors, refresh=False)

    tasks: list[asyncio.Task] = []
    if arrival.is_closed:
        queue = iter(specs)

        async def user() -> None:
            for spec in queue:  # shared: each user takes the next request
                if time.perf_counter() >= deadline:
                    return
                await one(spec, time.perf_counter() - run_start)

        tasks = [asyncio.create_task(user()) for _ in range(arrival.concurrency)]
    else:
        await _dispatch(specs, arrival.times(np.random.default_rng(seed), len(specs)), run_start, deadline, slots,
                        one, tasks)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline + bounds.grace_s - time.perf_counter()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    duration, cpu = time.perf_counter() - run_start, time.process_time() - cpu_start
    bar.close()
    records.sort(key=lambda r: r.index)
    return RunOutcome(records, duration, started_at, cpu)


async def _dispatch(specs, times, run_start, deadline, slots, one, tasks) -> None:
    """The open loop: each request at its time; never a request after the deadline."""
    async def held(spec: RequestSpec, scheduled: float) -> None:
        try:
            await one(spec, scheduled)
        finally:
            slots.release()

    for spec, at in zip(specs, times, strict=True):
        target = run_start + at
        if target >= deadline:
            break
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots is None:
            tasks.append(asyncio.create_task(one(spec, at)))
            continue
        try:
            await asyncio.wait_for(slots.acquire(), max(0.0, deadline - time.perf_counter()))
        except TimeoutError:  # the cap stayed full until the end: no more requests
            break
        if time.perf_counter() >= deadline:
            slots.release()
            break
        tasks.append(asyncio.create_task(held(spec, at)))
