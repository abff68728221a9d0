"""Which workers serve each model, and how busy they are: kept fresh from Redis.

A worker's life as the router sees it: it registers in Redis (cluster/state registry) → within one
poll interval `Discovery` reads the registry and the load reports (one SMEMBERS + MGET, one MGET,
in a thread: redis-py blocks) and the worker joins its model's pool in its role → every request the
router sends it counts in `WorkerState.num_in_flight` until it finishes, so the router's view of its
load is fresh between heartbeats → it stops heartbeating or deregisters → the next poll drops it
from the rotation (requests already running on it finish there).

With no Redis (or before the first read) a pool serves the static addresses it was built with.
Each poll also publishes this router's admission queue depth per (model, pool) for the autoscaler.
If Redis cannot be reached the last known workers stay in rotation and the next poll tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cluster.kv.hashing import prompt_block_hashes
from cluster.router.policy import Candidate
from cluster.state import LoadReport, StateStore, WorkerInfo

logger = logging.getLogger(__name__)

ROUTED_ROLES = ("prefill", "decode", "unified")
DEFAULT_BLOCK_SIZE = 16  # for static workers, which publish nothing


@dataclass(eq=False)
class WorkerState:
    """One worker: what it last published, and what this router has sent it since."""

    worker_id: str
    address: str
    block_size: int = DEFAULT_BLOCK_SIZE
    report: LoadReport | None = None
    num_in_flight: int = 0  # this router's requests on it now
    num_reserved_blocks: int = 0  # KV blocks those requests may come to hold
    down_until: float = 0.0  # monotonic time until which requests skip it: it just dropped one
    _in_flight_at_report: int = 0
    _reserved_at_report: int = 0

    def mark_down(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds

    @property
    def is_up(self) -> bool:
        return self.down_until <= time.monotonic()

    def observe(self, report: LoadReport | None) -> None:
        # A report already counts this router's requests that were on the worker when it was taken;
        # only the change since then is added on top (approximated at the time we first read it).
        if report != self.report:
            self.report = report
            self._in_flight_at_report = self.num_in_flight
            self._reserved_at_report = self.num_reserved_blocks

    @property
    def load(self) -> int:
        published = self.report.num_running + self.report.num_waiting if self.report else 0
        return max(published + self.num_in_flight - self._in_flight_at_report, self.num_in_flight)

    @property
    def free_blocks(self) -> int | None:
        if self.report is None:
            return None
        return self.report.num_free_blocks - max(self.num_reserved_blocks - self._reserved_at_report, 0)

    def candidate(self, cached_tokens: int = 0) -> Candidate:
        return Candidate(self.worker_id, self.load, self.free_blocks, cached_tokens)


class ModelWorkers:
    """One model's live workers by role, sorted by worker id (a stable order for round robin)."""

    def __init__(self, prefill: Iterable[str] = (), decode: Iterable[str] = (), unified: Iterable[str] = ()) -> None:
        # Static workers are named by their address: that is all anyone knows of them.
        self._roles: dict[str, dict[str, WorkerState]] = {
            role: {a: WorkerState(a, a) for a in addresses}
            for role, addresses in (("prefill", prefill), ("decode", decode), ("unified", unified))}

    def states(self, role: str) -> list[WorkerState]:
        return [self._roles[role][w] for w in sorted(self._roles[role])]

    def addresses(self, role: str) -> list[str]:
        return [s.address for s in self.states(role)]

    def roles(self) -> list[str]:
        return [role for role in ROUTED_ROLES if self._roles[role]]

    @property
    def is_ready(self) -> bool:
        """Some worker can take a request: decode workers prefill themselves without a prefill pool."""
        return bool(self._roles["decode"] or self._roles["unified"])

    def max_num_seqs(self) -> int | None:
        """Sequences the serving workers (decode, else unified) run at once, summed; None when any of
        them has not said (no report yet, or no limit)."""
        role = "decode" if self._roles["decode"] else "unified"
        limits = [s.report.max_num_seqs if s.report else 0 for s in self._roles[role].values()]
        return sum(limits) if limits and all(limits) else None

    def update(self, role: str, infos: Sequence[WorkerInfo], loads: Mapping[str, LoadReport]) -> None:
        current = self._roles[role]
        fresh: dict[str, WorkerState] = {}
        for info in infos:
            # The same object across polls (and for a static worker that registered): requests in
            # flight hold it and count themselves out of it when they finish.
            state = current.get(info.worker_id) or current.get(info.address) or WorkerState(info.worker_id, "")
            state.worker_id, state.address, state.block_size = info.worker_id, info.address, info.block_size
            state.observe(loads.get(info.worker_id))
            fresh[info.worker_id] = state
        self._roles[role] = fresh


class Discovery:
    """Polls Redis for every model's workers and loads; publishes queue depths."""

    def __init__(self, store: StateStore | None, workers: Mapping[str, ModelWorkers], router_id: str,
                 poll_interval_s: float = 0.5, queue_depths: Callable[[], dict[tuple[str, str], int]] | None = None,
                 on_change: Callable[[], None] | None = None, on_poll: Callable[[], None] | None = None) -> None:
        self.store = store
        self.workers = workers
        self.router_id = router_id
        self.poll_interval_s = poll_interval_s
        self._queue_depths = queue_depths or (lambda: {})
        self._on_change = on_change
        self._on_poll = on_poll  # more writes to Redis each poll, on the poll's thread (the router's traffic)
        self._task: asyncio.Task | None = None
        self._failing = False

    async def start(self) -> None:
        if self.store is None or self._task is not None:
            return
        await self.refresh()  # the first view before any request is routed
        self._task = asyncio.create_task(self._poll(), name="pdserve-discovery")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            depths = {key: 0 for key in self._queue_depths()}  # an exiting router queues nothing
            try:
                await asyncio.to_thread(self._publish, depths)
            except Exception:  # noqa: BLE001 - best effort; the reports expire by themselves
                pass

    async def refresh(self) -> None:
        if self.store is None:
            return
        depths = self._queue_depths()
        try:
            infos, loads = await asyncio.to_thread(self._read_and_publish, depths)
        except Exception as exc:  # noqa: BLE001 - Redis down: keep the last view, say so once
            if not self._failing:
                logger.warning("cannot read the worker registry (keeping the last known workers): %s", exc)
            self._failing = True
            return
        if self._failing:
            logger.info("worker registry readable again")
        self._failing = False
        by_key: dict[tuple[str, str], list[WorkerInfo]] = {}
        for info in infos:
            by_key.setdefault((info.model, info.role), []).append(info)
        for model, workers in self.workers.items():
            for role in ROUTED_ROLES:
                workers.update(role, by_key.get((model, role), []), loads)
        if self._on_change is not None:
            self._on_change()

    async def cached_tokens(self, prompt_ids: Sequence[int], states: Sequence[WorkerState]) -> dict[str, int]:
        """Per worker, how many leading tokens of the prompt its prefix cache holds (one Redis call
        per block size); empty when the prefix index cannot be read."""
        if self.store is None or not states:
            return {}
        groups: dict[int, list[str]] = {}
        for s in states:
            groups.setdefault(s.block_size, []).append(s.worker_id)
        try:
            return await asyncio.to_thread(self._lookup, list(prompt_ids), groups)
        except Exception as exc:  # noqa: BLE001 - routing without prefix hits beats not routing
            logger.warning("prefix-index lookup failed: %s", exc)
            return {}

    def _lookup(self, prompt_ids: list[int], groups: dict[int, list[str]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for block_size, ids in groups.items():
            hashes = prompt_block_hashes(prompt_ids, block_size)
            for worker_id, num_blocks in self.store.longest_prefix(hashes, ids).items():
                out[worker_id] = num_blocks * block_size
        return out

    def _read_and_publish(self, depths: dict[tuple[str, str], int]) -> tuple[list[WorkerInfo], dict]:
        infos = [w for w in self.store.list_workers() if w.model in self.workers]
        loads = self.store.get_loads([w.worker_id for w in infos])
        self._publish(depths)
        if self._on_poll is not None:
            self._on_poll()
        return infos, loads

    def _publish(self, depths: dict[tuple[str, str], int]) -> None:
        ttl = max(10.0, 20 * self.poll_interval_s)  # outlives a few missed polls, not a dead router
        for (model, pool), depth in depths.items():
            self.store.set_queue_depth(model, pool, self.router_id, depth, ttl_s=ttl)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            await self.refresh()
