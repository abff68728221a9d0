"""A small real cluster for the serving benchmarks: an embedded Redis, `pdserve worker` processes that
register there, and router processes that find them through it, each with its own routing policies.

    cluster = BenchCluster(Path("models/small"), [WorkerSpec("unified", cpus="0-1", threads=2)]).start()
    try:
        summary = drive(cluster.urls["default"], "bench", ...)   # the loadtest tool, through the router
        cluster.stats()                                          # each worker's Stats RPC
    finally:
        cluster.stop()

Each router is its own process (`python -m loadtest.bench_cluster --model DIR --redis-url URL ...`,
printing `READY host:port` like a worker), so the client and the router never share one Python
interpreter: the OpenAI HTTP API of cluster/router/http.py over `Router.from_config` — what `pdserve
up` serves, minus Ray — for every served name the workers register under. Several routers over the
same workers let one set of workers serve a run per policy, one router at a time (an idle router
only polls Redis). Workers publish their prefix-cache changes with each heartbeat (every
`registry_ttl_s / 3`): the prefix index the routers read is that stale. Everything starts side by
side — model loading dominates — and stops side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from cluster.protogen import ensure_generated
from loadtest.arrival import Arrival
from loadtest.backends import BackendConfig
from loadtest.bench import BenchConfig, run_bench
from loadtest.runner import Bounds
from loadtest.workers import WorkerProcess, start_worker
from loadtest.workload import WorkloadConfig

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

DEFAULT_NAME = "bench"


@dataclass(frozen=True)
class WorkerSpec:
    role: str  # prefill | decode | unified
    cpus: str | None = None  # taskset list, None: unpinned
    threads: int = 1
    extra: tuple[str, ...] = ()  # more `pdserve worker` flags (--num-kv-blocks, --no-prefix-caching, ...)
    served_name: str = DEFAULT_NAME  # the model name it registers under: one router pool per name


@dataclass(frozen=True)
class RouterSpec:
    prefill_policy: str = "least_loaded"
    decode_policy: str = "least_loaded"


@dataclass(frozen=True)
class WorkerStats:
    address: str
    served_name: str
    prefix_cache_hits: int  # prompt tokens found cached
    prefix_cache_queries: int  # prompt tokens looked up (0 with prefix caching off)

    def minus(self, before: WorkerStats) -> WorkerStats:
        return WorkerStats(self.address, self.served_name, self.prefix_cache_hits - before.prefix_cache_hits,
                           self.prefix_cache_queries - before.prefix_cache_queries)


def hit_rate(stats: list[WorkerStats]) -> float:
    """Cached prompt tokens over prompt tokens looked up, summed over workers (0 when none were)."""
    queries = sum(s.prefix_cache_queries for s in stats)
    return sum(s.prefix_cache_hits for s in stats) / queries if queries else 0.0


def stats_delta(after: list[WorkerStats], before: list[WorkerStats]) -> list[WorkerStats]:
    return [a.minus(b) for a, b in zip(after, before, strict=True)]


@dataclass
class BenchCluster:
    model_dir: Path
    workers: list[WorkerSpec]
    routers: dict[str, RouterSpec] = field(default_factory=lambda: {"default": RouterSpec()})
    dtype: str = "float32"
    router_cpus: str | None = None
    # A beat waits for the engine thread between two steps, and one long prefill step on a shared core
    # takes seconds: a short TTL drops busy workers out of the rotation (503s).
    registry_ttl_s: float = 9.0
    poll_interval_s: float = 0.5  # how often each router reads the registry and the loads
    start_timeout_s: float = 300.0
    procs: list[WorkerProcess] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)  # router key -> http://host:port

    def __post_init__(self) -> None:
        if not self.workers:
            raise ValueError("workers: a cluster needs at least one worker")
        if not self.routers:
            raise ValueError("routers: a cluster needs at least one router")
        self._redis = None
        self._routers: dict[str, subprocess.Popen] = {}

    @property
    def served_names(self) -> list[str]:
        return list(dict.fromkeys(w.served_name for w in self.workers))

    def start(self) -> BenchCluster:
        from cluster.state import start_embedded_redis

        try:
            self._redis = start_embedded_redis()
            for key, spec in self.routers.items():  # they load while the workers do
                self._routers[key] = self._popen_router(spec)
            with ThreadPoolExecutor(len(self.workers)) as pool:
                futures = [pool.submit(start_worker, w.role, self.model_dir, cpus=w.cpus, threads=w.threads,
                                       extra=self._worker_flags(w), timeout=self.start_timeout_s)
                           for w in self.workers]
            # Every worker that did start is kept, so that stop() ends it when another failed.
            self.procs = [f.result() for f in futures if f.exception() is None]
            failed = [f.exception() for f in futures if f.exception() is not None]
            if failed:
                raise failed[0]
            for key, proc in self._routers.items():
                self.urls[key] = f"http://{_ready_address(proc, self.start_timeout_s, f'router {key}')}"
            self._wait_routed()
        except BaseException:
            self.stop()
            raise
        return self

    def stats(self) -> list[WorkerStats]:
        """Every worker's prefix-cache counters now, in `workers` order."""
        out = []
        for spec, proc in zip(self.workers, self.procs, strict=True):
            with grpc.insecure_channel(proc.address) as channel:
                r = pb_grpc.WorkerStub(channel).Stats(pb.StatsRequest(), timeout=30)
            out.append(WorkerStats(proc.address, spec.served_name, r.prefix_cache_hits, r.prefix_cache_queries))
        return out

    def warm_up(self, num_tokens: int = 64, max_tokens: int = 4) -> None:
        """One request straight to each decode or unified worker's own API (not through a policy that
        might skip one), so first-call costs stay out of the figures. Its random tokens share no
        prefix with any workload's."""
        from cluster.request import SamplingParams
        from cluster.worker.convert import params_to_pb

        params = params_to_pb(SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))

        def one(i: int, proc: WorkerProcess) -> None:
            prompt = [16 + (i * 7919 + k * 104729) % 997 for k in range(num_tokens)]
            with grpc.insecure_channel(proc.address) as channel:
                request = pb.DecodeRequest(request_id=f"warmup-{i}", prompt_token_ids=prompt, sampling_params=params)
                for _ in pb_grpc.WorkerStub(channel).Decode(request, timeout=600):
                    pass

        targets = [(i, p) for i, p in enumerate(self.procs) if p.role != "prefill"]
        with ThreadPoolExecutor(len(targets)) as pool:
            list(pool.map(lambda target: one(*target), targets))

    def stop(self) -> None:
        for proc in self._routers.values():
            proc.terminate()
        for proc in self.procs:
            proc.proc.terminate()
        for proc in [*self._routers.values(), *(p.proc for p in self.procs)]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._routers.clear()
        self.procs.clear()
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    def _worker_flags(self, spec: WorkerSpec) -> list[str]:
        return ["--dtype", self.dtype, "--redis-url", self._redis.url, "--served-model-name", spec.served_name,
                "--registry-ttl", str(self.registry_ttl_s), *spec.extra]

    def _popen_router(self, spec: RouterSpec) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "loadtest.bench_cluster", "--model", str(self.model_dir),
               "--redis-url", self._redis.url, "--prefill-policy", spec.prefill_policy,
               "--decode-policy", spec.decode_policy, "--poll-interval", str(self.poll_interval_s)]
        for name in self.served_names:
            cmd += ["--name", name]
        if self.router_cpus is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", self.router_cpus, *cmd]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def _wait_routed(self, timeout: float = 60.0) -> None:
        """Until every worker is registered and every router has read the registry since."""
        from cluster.state import StateStore

        deadline = time.monotonic() + timeout
        store = StateStore.from_url(self._redis.url)
        try:
            while len([w for w in store.list_workers() if w.model in self.served_names]) < len(self.procs):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not all {len(self.procs)} workers registered within {timeout:.0f} s")
                time.sleep(0.1)
        finally:
            store.close()
        for key, url in self.urls.items():
            while httpx.get(f"{url}/ready", timeout=10).status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"router {key} found no worker within {timeout:.0f} s")
                time.sleep(0.1)
        time.sleep(2 * self.poll_interval_s)  # one more poll: every worker in every router's view


def _ready_address(proc: subprocess.Popen, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY "):
            return line.split()[1]
        if proc.poll() is not None:
            break
    raise RuntimeError(f"{what} did not start: {' '.join(proc.args)}")


def drive(base_url: str, model: str, tokenizer_dir: Path, workload: WorkloadConfig, arrival: Arrival,
          num_requests: int, *, timeout_s: float = 600.0, duration_s: float = 1800.0, label: str = "",
          progress: bool = True, warmup: int = 0) -> dict[str, Any]:
    """One run of the loadtest tool (streamed /v1/completions, token-id prompts of exact lengths,
    ignore_eos, greedy) against `base_url`, after `warmup` requests of its own; the run's summary
    (loadtest/measure.py)."""
    config = BenchConfig(backend=BackendConfig(base_url=base_url, model=model, timeout_s=timeout_s),
                         workload=workload, arrival=arrival,
                         bounds=Bounds(num_requests=num_requests, duration_s=duration_s, timeout_s=timeout_s),
                         tokenizer=tokenizer_dir, prompt_format="ids", result=None, is_progress=progress, label=label,
                         warmup=warmup)
    doc = asyncio.run(run_bench(config, out=lambda *_: None))
    return doc["runs"][0]["summary"]


def serve_router(args: argparse.Namespace) -> None:
    """The router process: the OpenAI HTTP API over Router.from_config, workers found in Redis."""
    import uvicorn

    from cluster.model.arch import ModelArchConfig
    from cluster.model.tokenizer import Tokenizer
    from cluster.router.core import Router
    from cluster.router.dispatch import ModelPool
    from cluster.router.http import create_app

    arch, tokenizer = ModelArchConfig.from_dir(args.model), Tokenizer.from_dir(args.model)
    pools = {name: ModelPool(name, tokenizer, arch.max_position_embeddings) for name in args.name or [DEFAULT_NAME]}
    router = Router.from_config(pools, {"prefill_policy": args.prefill_policy, "decode_policy": args.decode_policy,
                                        "poll_interval_s": args.poll_interval}, redis_url=args.redis_url)
    # Bound here so port 0 works and is known before READY; IPPROTO_TCP so asyncio sets TCP_NODELAY.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    server = uvicorn.Server(uvicorn.Config(create_app(router), log_level="warning", access_log=False, backlog=2048))

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        print(f"READY {args.host}:{sock.getsockname()[1]}", flush=True)
        await task

    asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="the serving benchmarks' router process (see the module docstring)")
    p.add_argument("--model", type=Path, required=True, help="checkpoint dir: tokenizer and context length")
    p.add_argument("--name", action="append", help=f"a served model name (repeatable; default {DEFAULT_NAME})")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--prefill-policy", default="least_loaded")
    p.add_argument("--decode-policy", default="least_loaded")
    p.add_argument("--poll-interval", type=float, default=0.5)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    serve_router(p.parse_args(argv))


if __name__ == "__main__":
    main()
