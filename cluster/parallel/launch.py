"""Starting and stopping a TP replica: rank 0 is the calling process, ranks 1.. are spawned processes.

    engine, handle = launch_tp_engine("models/tiny", EngineConfig(tensor_parallel_size=2), kv_transport="grpc")
    ...                      # drive `engine` like any LLMEngine, from one thread
    handle.shutdown()        # STOP to the followers, join them (terminate/kill stragglers)

Start-up, across ranks:
1. Rank 0 opens a TCPStore on 127.0.0.1 (any free port) and spawns `run_follower(rank, ...)` for each
   rank > 0 (torch.multiprocessing, spawn: no fork of a process that may hold threads and a model).
2. Every rank builds the replica's groups over the store (`init_tp_context`: gloo on CPU; on GPU, NCCL
   for the layers plus gloo for the plans) and loads its shard of the model.
3. Rank 0 builds its LLMEngine and publishes the KV block count; followers size their caches by it,
   start their KV endpoint (decode side) and publish its address, which rank 0 hands to the worker
   that advertises this replica's KVDestination.
4. Followers run `follower_loop` until rank 0 sends STOP (`TPHandle.shutdown`). If rank 0 dies instead,
   gloo breaks the followers' pending receive at once, and the kernel's parent-death signal is a
   second line of defence for spawned ranks.

`run_follower` is a plain function of plain arguments so that a Ray actor can run it instead of a
spawned process (the lead's actor wrapper passes the store's host and port).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed import PrefixStore, ProcessGroupGloo, Store, TCPStore

from cluster.attention.selector import create_attention_backend
from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine, _resolve_dtype
from cluster.engine.runner import ModelRunner
from cluster.model.loader import load_model
from cluster.parallel.follower import FollowerTransfers, follower_loop
from cluster.parallel.kv_endpoint import start_kv_endpoint
from cluster.parallel.plan import PlanChannel, PlanKind, StepPlan
from cluster.parallel.rank0 import NUM_STATS, TPKVTransferCoordinator
from cluster.parallel.routed import KVGeometry
from cluster.parallel.state import TPContext, TPGroup

logger = logging.getLogger(__name__)

RENDEZVOUS_HOST = "127.0.0.1"
# Followers wait on the plan broadcast for as long as rank 0 idles. A dead peer breaks that wait at once
# (gloo reports the closed connection), so this only bounds a hang of a live but stuck rank.
IDLE_TIMEOUT = datetime.timedelta(days=30)
START_TIMEOUT_S = 120.0
_STATS = ("senders", "receivers", "registered")


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r of a replica on "cuda" (or "cuda:N") uses the r-th GPU from there; on CPU, the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.device("cuda", (dev.index or 0) + rank)
    return dev


def init_tp_context(store: Store, rank: int, size: int, device: torch.device) -> TPContext:
    """This rank's groups of the replica (standalone: torch.distributed's default group stays unset)."""
    control = TPGroup(rank, size, ProcessGroupGloo(PrefixStore("control", store), rank, size, IDLE_TIMEOUT))
    if device.type != "cuda":
        return TPContext(model=control, control=control)
    torch.cuda.set_device(device)
    nccl = dist.ProcessGroupNCCL(PrefixStore("model", store), rank, size)  # type: ignore[attr-defined]
    return TPContext(model=TPGroup(rank, size, nccl), control=control)


def run_follower(rank: int, size: int, store_host: str, store_port: int, model_dir: str, config: EngineConfig,
                 kv_transport: str | None = None, kv_host: str = RENDEZVOUS_HOST) -> None:
    """TP rank `rank` (> 0) of a replica, until rank 0 sends STOP."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    store = TCPStore(store_host, store_port, None, is_master=False,
                     timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    store.set(f"joined/{rank}", "1")
    device = rank_device(config.device, rank)
    tp = init_tp_context(store, rank, size, device)
    dtype = _resolve_dtype(config.dtype, device)
    model, arch = load_model(model_dir, dtype, device, tp.model)
    attn = create_attention_backend(
        config.attention_backend, num_layers=arch.num_layers, num_blocks=int(store.get("num_kv_blocks")),
        block_size=config.block_size, num_kv_heads=model.num_kv_heads_per_rank, head_dim=arch.head_dim,
        dtype=dtype, device=device,
    )
    endpoint = start_kv_endpoint(kv_transport, kv_host) if kv_transport else None
    geometry = KVGeometry(arch.num_layers, config.block_size, arch.head_dim, str(dtype).removeprefix("torch."),
                          arch.num_kv_heads, size, rank)
    transfers = FollowerTransfers(attn, geometry, endpoint)
    store.set(f"kv_address/{rank}", endpoint.address if endpoint is not None else "")
    try:
        follower_loop(PlanChannel(tp.control), ModelRunner(model, attn, None, device), transfers)
    finally:
        transfers.close()
        if endpoint is not None:
            endpoint.close()
        for transport in ("cluster.transfer.grpc", "cluster.transfer.dist"):  # cached channels and links
            if transport in sys.modules:
                sys.modules[transport].close_all()


def _spawned_follower(*args) -> None:
    """Entry point of a spawned rank: die with the parent even if it is SIGKILLed (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s tp-rank{args[0]} %(levelname)s %(name)s: %(message)s")
    code = 0
    try:
        run_follower(*args)
    except Exception:  # a start-up error, or rank 0 gone (the group reports the closed connection)
        logger.exception("TP rank %s exits", args[0])
        code = 1
    # Skip interpreter teardown: destroying gloo's still-running C++ threads there can abort the
    # process ("terminate called without an active exception") after a clean STOP.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class TPHandle:
    """Rank 0's hold on the other ranks of its replica."""

    def __init__(self, engine: LLMEngine, processes: list[BaseProcess], kv_addresses: list[str],
                 store: TCPStore | None = None) -> None:
        self.engine = engine
        self.processes = processes
        self.kv_addresses = kv_addresses  # KV endpoint of ranks 1.. ("" without a kv_transport)
        self._store = store  # lives as long as the replica: the followers' store clients point at it

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def follower_stats(self) -> list[dict[str, int]]:
        """Per rank > 0: its live senders, receivers and transfers registered with its KV endpoint."""
        transfers = self.engine.transfers
        if not isinstance(transfers, TPKVTransferCoordinator):
            return []
        table = transfers.follower_stats()
        assert table.shape[1] == NUM_STATS
        return [dict(zip(_STATS, row, strict=True)) for row in table[1:].tolist()]

    def check_no_leaks(self) -> None:
        """Raise AssertionError unless every rank is idle: rank 0's KV accounting (it owns every block)
        and transfers, and no follower holding a sender, receiver or registration."""
        self.engine.kv_manager.check_no_leaks()
        transfers = self.engine.transfers
        assert not transfers.senders and not transfers.receivers, "rank 0 still holds KV transfers"
        for rank, stats in enumerate(self.follower_stats(), start=1):
            assert not any(stats.values()), f"TP rank {rank} still holds {stats}"

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every follower and wait for it; call it after the thread driving the engine has stopped."""
        channel = getattr(self.engine.runner, "channel", None)
        if channel is not None and not channel.closed:
            try:
                channel.send(StepPlan(PlanKind.STOP))
            except Exception as exc:  # a follower already gone: the joins below clean up
                logger.warning("could not send STOP to the TP ranks: %s", exc)
                channel.closed = True
        deadline = time.monotonic() + timeout_s
        for proc in self.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.processes:
            if proc.is_alive():
                logger.warning("TP rank process %s did not stop; killing it", proc.pid)
                proc.kill()
                proc.join(5.0)

    def __enter__(self) -> TPHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _wait_keys(store: TCPStore, keys: list[str], processes: list[BaseProcess], timeout_s: float) -> list[str]:
    """The keys' values once all are set; raises if a rank dies or the time runs out first."""
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        dead = [p.name for p in processes if not p.is_alive()]
        if dead:
            raise RuntimeError(f"TP rank process(es) {dead} exited during start-up (see their log)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"TP ranks did not start within {timeout_s:.0f}s (waiting for {keys})")
        time.sleep(0.01)
    return [store.get(k).decode() for k in keys]


def spawn_follower_process(rank: int, args: tuple) -> BaseProcess:
    """Start TP rank `rank` as a child process (the default way to start followers)."""
    proc = mp.get_context("spawn").Process(target=_spawned_follower, name=f"pdserve-tp-rank{rank}", daemon=True,
                                           args=args)
    proc.start()
    return proc


def launch_tp_engine(model_dir: str | Path, config: EngineConfig, *, kv_transport: str | None = None,
                     kv_host: str = RENDEZVOUS_HOST, start_timeout_s: float = START_TIMEOUT_S,
                     start_follower: Callable[[int, tuple], BaseProcess] = spawn_follower_process,
                     ) -> tuple[LLMEngine, TPHandle]:
    """Start a replica of `config.tensor_parallel_size` ranks; this process is rank 0 and gets the engine.

    `kv_transport` ("grpc" | "dist"): ranks > 0 start a KV endpoint of that kind on `kv_host` so a
    prefill worker can send them their heads (decode side); their addresses are `handle.kv_addresses`.
    `start_follower(rank, run_follower_args)` starts one rank and returns something process-like
    (`name`, `pid`, `is_alive()`, `join(t)`, `kill()`): a child process by default, a Ray actor in
    cluster/worker/actor.py.
    """
    size = config.tensor_parallel_size
    if kv_transport not in (None, "grpc", "dist"):
        raise ValueError(f"kv_transport for the TP ranks must be 'grpc' or 'dist' (the 'local' transport cannot "
                         f"reach other processes), got {kv_transport!r}")
    if size == 1:
        engine = LLMEngine(str(model_dir), config)
        return engine, TPHandle(engine, [], [])
    store = TCPStore(RENDEZVOUS_HOST, 0, None, is_master=True, wait_for_workers=False,
                     timeout=datetime.timedelta(seconds=start_timeout_s))
    processes: list[BaseProcess] = []
    try:
        for rank in range(1, size):
            args = (rank, size, RENDEZVOUS_HOST, store.port, str(model_dir), config, kv_transport, kv_host)
            processes.append(start_follower(rank, args))
        others = range(1, size)
        _wait_keys(store, [f"joined/{r}" for r in others], processes, start_timeout_s)
        tp = init_tp_context(store, 0, size, rank_device(config.device, 0))
        engine = LLMEngine(str(model_dir), config, tp)
        store.set("num_kv_blocks", str(engine.num_kv_blocks))
        addresses = _wait_keys(store, [f"kv_address/{r}" for r in others], processes, start_timeout_s)
    except BaseException:
        for proc in processes:
            proc.kill()
            proc.join(5.0)
        raise
    return engine, TPHandle(engine, processes, addresses, store)
