"""A worker's presence in the cluster's Redis: register, heartbeat with load and prefix-cache changes, leave.

A worker's life in the registry (one `Registration`, an asyncio task beside the gRPC server):
1. Start, once the server listens: register a `WorkerInfo` (id "{model}-{role}-{8 hex}", address,
   role, TP size, KV block size) under a key whose TTL is the worker's liveness. Routers now list it.
2. Every ttl/3, a beat: extend the TTL, read the worker's figures (for an engine worker, on the engine
   thread between two steps) and publish them as a `LoadReport`, and move the prefix-cache changes
   since the last beat (block hashes cached, evicted) into the prefix index, so routers can send a
   prompt to the worker that already holds its prefix. The next beat waits for this one, so an engine
   stuck for longer than the TTL stops the heartbeats and leaves the rotation — on purpose: it could
   not serve either. It comes back, with a snapshot of its cache, once the engine answers again.
3. Trouble never stops the worker: Redis unreachable → log, keep serving, try again next beat. The
   changes drained by a beat that failed are lost, so the next good beat sends a snapshot of the whole
   cache instead. The record expired meanwhile (the heartbeat or `add_blocks` says so) → register
   again (which wipes the old index entries) and send a snapshot.
4. Leave: on Drain or a clean shutdown `leave()` stops the beats and deregisters, so routers stop
   choosing the worker now rather than a TTL later. A worker killed outright drops out when its TTL
   runs out; its load report and index entries expire with it.

No torch here: the simulated worker registers through the same class.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.state.base import DEFAULT_TTL_S
from cluster.state.load import LoadReport
from cluster.state.registry import WorkerInfo
from cluster.state.store import StateStore

if TYPE_CHECKING:
    from cluster.kv.block_pool import CacheEvents

logger = logging.getLogger(__name__)

_LEAVE_TIMEOUT_S = 5.0  # a drain or shutdown waits this long at most for Redis
_MAX_CLIENT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class WorkerReport:
    """What one beat publishes. `cache_events` None: the worker has no prefix cache to index."""

    load: LoadReport
    cache_events: CacheEvents | None = None


# Called once per beat; the argument asks for a snapshot of the whole prefix cache instead of changes.
ReadReport = Callable[[bool], Awaitable[WorkerReport]]


def new_worker_id(model: str, role: str) -> str:
    return f"{model}-{role}-{uuid.uuid4().hex[:8]}"


def advertised_address(host: str, port: int) -> str:
    """The address others should dial: a wildcard bind ("0.0.0.0", "::") is not one, so name this
    host's own address instead."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostbyname(socket.gethostname())
    return f"{host}:{port}"


class Registration:
    def __init__(self, store: StateStore, info: WorkerInfo, read_report: ReadReport,
                 ttl_s: float = DEFAULT_TTL_S) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.store = store
        self.info = info
        self.ttl_s = ttl_s
        self.interval_s = ttl_s / 3  # two beats may be missed before the record expires
        self._read_report = read_report
        self._is_registered = False
        self._needs_snapshot = True
        self._is_failing = False  # log the first failure loudly, the rest quietly until it recovers
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._has_left = False
        self.num_beats = 0  # successful ones
        self.num_failed_beats = 0

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    async def start(self) -> Registration:
        """Run the first beat now (so a reachable Redis lists the worker before it reports ready),
        then keep beating in a background task."""
        await self._safe_beat()
        self._task = asyncio.create_task(self._run(), name=f"registration-{self.worker_id}")
        return self

    async def leave(self) -> None:
        """Stop beating and deregister (best effort, bounded in time). Idempotent."""
        if self._has_left:
            return
        self._has_left = True
        self._stopping.set()
        if self._task is not None:
            try:  # the beat in flight is bounded by the client's socket timeouts
                await asyncio.wait_for(asyncio.shield(self._task), _LEAVE_TIMEOUT_S)
            except TimeoutError:
                self._task.cancel()
        try:
            await asyncio.wait_for(asyncio.to_thread(self.store.deregister, self.worker_id), _LEAVE_TIMEOUT_S)
            logger.info("worker %s left the registry", self.worker_id)
        except Exception as exc:  # it will expire with its TTL instead
            logger.warning("worker %s could not deregister (%s); it expires in %.1fs", self.worker_id, exc,
                           self.ttl_s)
        await asyncio.to_thread(self.store.close)

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
                return
            except TimeoutError:
                await self._safe_beat()

    async def _safe_beat(self) -> None:
        try:
            await self.beat()
        except Exception as exc:
            self.num_failed_beats += 1
            if not self._is_failing:
                logger.warning("worker %s: heartbeat failed (%s: %s); serving on, retrying every %.1fs",
                               self.worker_id, type(exc).__name__, exc, self.interval_s)
            self._is_failing = True
            return
        if self._is_failing:
            logger.info("worker %s: heartbeats go through again", self.worker_id)
        self._is_failing = False
        self.num_beats += 1

    async def beat(self) -> None:
        """One heartbeat: stay registered, publish the load, index the prefix-cache changes."""
        store, wid, ttl = self.store, self.worker_id, self.ttl_s
        if self._is_registered and not await asyncio.to_thread(store.heartbeat, wid, ttl):
            logger.warning("worker %s: registry record had expired; registering again", wid)
            self._is_registered = False
        if not self._is_registered:
            await asyncio.to_thread(store.register, self.info, ttl)
            self._is_registered = True
            self._needs_snapshot = True  # register dropped this id's index entries
        report = await self._read_report(self._needs_snapshot)
        # From here until the index has them, the drained changes exist nowhere else: if this beat
        # fails, the next one must send the whole cache.
        self._needs_snapshot = True
        await asyncio.to_thread(store.publish_load, wid, report.load, ttl)
        events = report.cache_events
        if events is not None and not await asyncio.to_thread(self._index, events):
            self._is_registered = False  # expired between the heartbeat and now: next beat re-registers
            return
        self._needs_snapshot = False

    def _index(self, events: CacheEvents) -> bool:
        """Apply cache events to the prefix index; False when the worker's record is gone."""
        store, wid = self.store, self.worker_id
        if events.is_snapshot:
            return store.replace_blocks(wid, events.stored) is not None
        if events.removed:
            store.remove_blocks(wid, events.removed)
        return store.add_blocks(wid, events.stored) is not None


async def start_registration(redis_url: str, info: WorkerInfo, read_report: ReadReport,
                             ttl_s: float = DEFAULT_TTL_S) -> Registration:
    """Connect (with socket timeouts well inside the TTL) and start registering `info`."""
    store = StateStore.from_url(redis_url, timeout_s=min(ttl_s / 2, _MAX_CLIENT_TIMEOUT_S))
    return await Registration(store, info, read_report, ttl_s).start()


__all__ = ["ReadReport", "Registration", "WorkerReport", "advertised_address", "new_worker_id",
           "start_registration"]
