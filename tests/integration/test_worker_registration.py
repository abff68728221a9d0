"""Workers in the cluster's Redis (a real embedded redis-server, real worker processes): they register,
publish their load, index their prefix-cache blocks under the hashes a router computes from the
prompt, survive a Redis restart, leave on SIGTERM and Drain, and drop out after the TTL when killed.
`pdserve status` reads it all back. Waits poll with generous bounds; nothing asserts a duration."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cluster.config import EngineConfig
from cluster.kv.hashing import prompt_block_hashes
from cluster.protogen import ensure_generated
from cluster.request import SamplingParams
from cluster.state import EmbeddedRedis, StateStore, WorkerInfo, start_embedded_redis
from cluster.status import collect_status
from cluster.worker.convert import params_to_pb
from loadtest.workers import WorkerProcess, start_cli_worker

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

TTL_S = "1.5"  # short, so a killed worker drops out quickly; beats every 0.5 s


@pytest.fixture
def redis_dir() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to ~100 bytes) that outlives one Redis."""
    path = Path(tempfile.mkdtemp(prefix="pdsreg-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def redis_server(redis_dir: Path) -> Iterator[EmbeddedRedis]:
    server = start_embedded_redis(redis_dir)
    yield server
    server.close()


@pytest.fixture
def store(redis_server: EmbeddedRedis) -> Iterator[StateStore]:
    s = StateStore.from_url(redis_server.url)
    yield s
    s.close()


def wait_for(read, timeout_s: float = 60.0, what: str = "condition"):
    """Poll `read()` until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = read()
        except Exception:  # e.g. Redis restarting under us
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def start_engine_worker(model_dir: Path, redis_url: str, *flags: str) -> WorkerProcess:
    return start_cli_worker(["--role", "unified", "--model", str(model_dir), "--threads", "1", "--num-kv-blocks", "64",
                             "--max-num-seqs", "8", "--redis-url", redis_url, "--registry-ttl", TTL_S, *flags],
                            env={"OMP_NUM_THREADS": "1"})


def only_worker(store: StateStore, model: str) -> WorkerInfo:
    workers = wait_for(lambda: store.list_workers(model=model), what=f"a {model} worker in the registry")
    assert len(workers) == 1
    return workers[0]


def generate(address: str, rid: str, prompt: list[int], max_tokens: int = 3) -> list[int]:
    params = params_to_pb(SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    with grpc.insecure_channel(address) as channel:
        chunks = pb_grpc.WorkerStub(channel).Decode(
            pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=params), timeout=120)
        return [t for chunk in chunks for t in chunk.token_ids]


def num_indexed_prefix_blocks(store: StateStore, worker: WorkerInfo, prompt: list[int]) -> int:
    hashes = prompt_block_hashes(prompt, worker.block_size)  # what a router computes
    return store.longest_prefix(hashes, [worker.worker_id])[worker.worker_id]


def random_prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(8, 2000) for _ in range(n)]


def test_worker_registers_publishes_load_and_prefix_blocks_then_expires_when_killed(
        store: StateStore, redis_server: EmbeddedRedis, tiny_model_dir: Path) -> None:
    proc = start_engine_worker(tiny_model_dir, redis_server.url, "--served-model-name", "tiny-served")
    try:
        info = only_worker(store, "tiny-served")
        assert info.role == "unified" and info.address == proc.address and info.tp == 1
        assert info.block_size == EngineConfig().block_size
        assert info.worker_id.startswith("tiny-served-unified-")
        with grpc.insecure_channel(proc.address) as channel:
            assert pb_grpc.WorkerStub(channel).Stats(pb.StatsRequest()).worker_id == info.worker_id

        load = wait_for(lambda: store.get_loads([info.worker_id]).get(info.worker_id), what="a load report")
        assert (load.num_total_blocks, load.max_num_seqs, load.num_running) == (64, 8, 0)

        prompt = random_prompt(1, 2 * info.block_size + 5)  # two full blocks and a partial one
        other = random_prompt(2, 2 * info.block_size)
        assert num_indexed_prefix_blocks(store, info, prompt) == 0
        assert len(generate(proc.address, "r1", prompt)) == 3
        wait_for(lambda: num_indexed_prefix_blocks(store, info, prompt) == 2, what="the prompt's blocks in the index")
        assert num_indexed_prefix_blocks(store, info, other) == 0
        load = wait_for(lambda: (r := store.get_loads([info.worker_id]).get(info.worker_id))
                        and r.prefix_cache_queries >= len(prompt) and r, what="the prompt in the load counters")
        assert load.num_running == 0 and load.kv_usage == 0.0

        status = collect_status(store)
        (pool,) = status.pools
        assert (pool.model, pool.pool, [w.worker_id for w in pool.workers]) == ("tiny-served", "unified",
                                                                               [info.worker_id])
        assert pool.workers[0].num_cached_blocks >= 2 and pool.workers[0].load is not None
    finally:
        proc.proc.kill()  # SIGKILL: no goodbye, the TTL has to do it
        proc.proc.wait(timeout=30)
    wait_for(lambda: not store.list_workers(), what="the killed worker to expire")
    assert store.get_loads([info.worker_id]) == {} and store.num_blocks(info.worker_id) == 0


def test_worker_outlives_a_redis_restart_and_republishes_its_prefix_blocks(
        redis_dir: Path, tiny_model_dir: Path) -> None:
    server = start_embedded_redis(redis_dir)
    proc = start_engine_worker(tiny_model_dir, server.url)
    store = StateStore.from_url(server.url)
    try:
        info = only_worker(store, tiny_model_dir.name)
        prompt = random_prompt(3, 3 * info.block_size)
        generate(proc.address, "before", prompt)
        wait_for(lambda: num_indexed_prefix_blocks(store, info, prompt) == 3, what="the prompt's blocks")

        server.close()
        time.sleep(3 * float(TTL_S))  # several heartbeats fail meanwhile
        assert proc.proc.poll() is None
        assert len(generate(proc.address, "while-down", random_prompt(4, 10))) == 3

        server = start_embedded_redis(redis_dir)  # same socket, empty: nothing survived but the worker
        again = only_worker(store, tiny_model_dir.name)
        assert again.worker_id == info.worker_id
        wait_for(lambda: num_indexed_prefix_blocks(store, info, prompt) == 3, what="a snapshot of the cache")
    finally:
        proc.stop()
        store.close()
        server.close()


def start_simulated_worker(redis_url: str, *flags: str) -> WorkerProcess:
    return start_cli_worker(["--role", "simulated", "--itl-ms", "20", "--max-concurrency", "4",
                             "--redis-url", redis_url, *flags], timeout=60)


def test_simulated_worker_load_is_its_in_flight_streams(store: StateStore, redis_server: EmbeddedRedis) -> None:
    worker = start_simulated_worker(redis_server.url, "--registry-ttl", TTL_S)
    try:
        info = only_worker(store, "simulated")
        assert info.role == "simulated" and info.address == worker.address
        with grpc.insecure_channel(worker.address) as channel:
            params = params_to_pb(SamplingParams(max_tokens=100_000, ignore_eos=True))
            stream = pb_grpc.WorkerStub(channel).Decode(
                pb.DecodeRequest(request_id="long", prompt_token_ids=[1, 2, 3], sampling_params=params))
            next(stream)
            load = wait_for(lambda: (r := store.get_loads([info.worker_id]).get(info.worker_id))
                            and r.num_running == 1 and r, what="the stream in the load report")
            assert (load.num_total_blocks, load.max_num_seqs, load.kv_usage) == (4, 4, 0.25)
            stream.cancel()
            wait_for(lambda: (r := store.get_loads([info.worker_id]).get(info.worker_id)) and r.num_running == 0,
                     what="the cancelled stream to leave the load")
    finally:
        worker.stop()


def test_workers_leave_the_registry_on_drain_and_on_sigterm(store: StateStore, redis_server: EmbeddedRedis) -> None:
    # A long TTL: leaving the registry right after Drain or SIGTERM can only be deregistration.
    drained = start_simulated_worker(redis_server.url, "--served-model-name", "sim-a", "--registry-ttl", "60")
    stopped = start_simulated_worker(redis_server.url, "--served-model-name", "sim-b", "--registry-ttl", "60")
    try:
        only_worker(store, "sim-a")
        only_worker(store, "sim-b")
        with grpc.insecure_channel(drained.address) as channel:
            assert pb_grpc.WorkerStub(channel).Drain(pb.DrainRequest()).accepted
        assert [w.model for w in store.list_workers()] == ["sim-b"]
        assert drained.proc.poll() is None  # drained, still serving what it has

        stopped.proc.send_signal(signal.SIGTERM)
        assert stopped.proc.wait(timeout=30) == 0
        assert store.list_workers() == []
    finally:
        drained.stop()
        stopped.stop()


def run_status_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "status", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}, timeout=60)


def test_pdserve_status_reads_a_live_redis(store: StateStore, redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    worker = start_simulated_worker(redis_server.url, "--served-model-name", "sim-status")
    try:
        info = only_worker(store, "sim-status")
        wait_for(lambda: store.get_loads([info.worker_id]), what="a load report")
        store.set_queue_depth("sim-status", "simulated", "router-1", 5)
        store.set_queue_depth("other-model", "decode", "router-1", 2)

        table = run_status_cli("--redis-url", redis_server.url)
        assert table.returncode == 0, table.stderr
        assert "model sim-status" in table.stdout and "pool simulated: 1 worker, queue depth 5" in table.stdout
        line = next(line for line in table.stdout.splitlines() if info.worker_id in line)
        assert info.address in line and "0.0%" in line
        assert "model other-model" in table.stdout and "pool decode: 0 workers, queue depth 2" in table.stdout

        # No flag: the URL comes from .pdserve/up.json in the current directory, as `pdserve up` writes it.
        (tmp_path / ".pdserve").mkdir()
        (tmp_path / ".pdserve" / "up.json").write_text(json.dumps({"redis_url": redis_server.url}))
        as_json = run_status_cli("--json", cwd=tmp_path)
        assert as_json.returncode == 0, as_json.stderr
        data = json.loads(as_json.stdout)
        pools = {(m["model"], p["pool"]): p for m in data["models"] for p in m["pools"]}
        assert pools[("sim-status", "simulated")]["workers"][0]["worker_id"] == info.worker_id
        assert pools[("sim-status", "simulated")]["workers"][0]["load"]["max_num_seqs"] == 4
        assert pools[("other-model", "decode")] == {"pool": "decode", "queue_depth": 2, "num_workers": 0,
                                                   "workers": []}
    finally:
        worker.stop()

    missing = run_status_cli(cwd=tmp_path / ".pdserve")  # no flag, no up.json there
    assert missing.returncode == 2 and "pdserve up" in missing.stderr
    unreachable = run_status_cli("--redis-url", "unix:///nonexistent/redis.sock")
    assert unreachable.returncode == 1 and "cannot read Redis" in unreachable.stderr
