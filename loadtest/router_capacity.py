"""Router capacity on simulated workers: how many token streams one router process holds at once, how
many tokens per second it relays, and the latency it adds to each stream.

    python -m loadtest.router_capacity [--steps 500,1000,2000] [--itl-ms 2000] [--itl-sweep 1000,500,250]
                                       [--write BENCHMARKS.md] [--json out.json]

Setup (2 cores): a simulated prefill and a simulated decode worker (cluster/worker/simulated.py: no
model, token i of a stream due at a fixed time, ttft + i·itl after its request, each stream on its
own schedule as if spread over many decode workers whose steps are not aligned) on core 1; the
router, one uvicorn process (uvloop, httptools, collector tuned: loadtest/router_serve.py) with the
tiny model's tokenizer so it detokenizes real ids, alone on core 0; this client on core 1 beside the
workers while it streams through the router, and on core 0 (the router idle) for the direct run, so
the baseline's gRPC client, dearer than the raw HTTP one, does not slow the workers.

A step holds N streams twice with the same schedule: straight to the workers over gRPC (the router's
own Decode(expect_kv) → Prefill → decode stream sequence: the baseline), then as streaming
/v1/completions through the router. N slots start their first stream at N / (one stream's duration)
per second — new streams at a bounded rate, spread evenly over a stream's length, the rate they will
finish at — and each starts its next stream as soon as one ends, so N stay open (each router slot on
one keep-alive connection). Once all N are up and `--settle` seconds have passed, `--hold` seconds are
measured; then every stream still running is cut (the router sees its clients go away). The steps
ramp N up at `--itl-ms`, then sweep the ITL down at the largest N (more tokens per second through the
same streams) until the router saturates.

Measured in the window only (N held, steady state):
- TTFT: request written → first token's text read, for the streams sent in the window;
- token delay: for each token i ≥ 1 that arrived in it, arrival − request written − i·itl: how late
  against the worker's schedule the token reached the client;
- ITL: the gap to the previous token, where both came in chunks of their own;
- added = via the router − direct, percentile by percentile (P50, P99): the latency the router adds.
A token the router's detokenizer holds back (random ids can end inside a UTF-8 character) arrives
with the next one: it is left out of these figures and counted, so chunks joined by the detokenizer
neither read as router slowness nor shorten the ITL (loadtest/stream_stats.py).

Checked for every stream: HTTP 200, the text equals what the simulated worker sent (its tokens are a
hash of the request id, which every chunk carries, run through the same incremental detokenizer; a
cut stream's text must be a prefix of it), usage counts every token, `[DONE]` ends it. Anything else
is an error. Held streams (request written, response not finished) are sampled every 50 ms.

The client keeps its own CPU off the figures: raw HTTP on asyncio Protocols whose hot path only stamps
times and keeps bytes (loadtest/stream_clients.py); chunk framing, SSE, JSON and the text checks come
after the run. Reported beside the latencies: the CPU the router and core 1 (workers + client) used in
the window, each as a share of one core, and the router's CPU per relayed token — a router near
100 % is saturated, and its added latency is queueing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from cluster.model.tokenizer import Tokenizer
from cluster.protogen import ensure_generated
from loadtest.report import write_section
from loadtest.router_serve import (
    RouterProcess,
    pin_threads,
    process_cpu_seconds,
    raise_fd_limit,
    start_router,
)
from loadtest.stream_clients import (
    Gauge,
    StreamRecord,
    completion_request,
    direct_stream,
    hold,
    router_stream,
)
from loadtest.stream_stats import Setup, direct_result, router_result, window_stats
from loadtest.workers import start_worker

ensure_generated()
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

MODEL_NAME = "tiny"
PROMPT = "Explain why a serving system splits prefill from decode."
SATURATED_MS = 100.0  # the ITL sweep stops once the median added TTFT passes this (or errors appear)


@dataclass(frozen=True)
class Cores:
    """Who runs where on 2 cores or more (see the module docstring)."""

    router: int = 0
    workers: int = 1

    def client(self, kind: str) -> set[int]:
        return {self.router if kind == "direct" else self.workers}


class CpuMeter:
    """CPU seconds of the router, the workers and this client between two samples."""

    def __init__(self, router_pid: int, worker_pids: list[int]) -> None:
        self.router_pid, self.worker_pids = router_pid, worker_pids

    def sample(self) -> tuple[float, float, float, float]:
        return (time.perf_counter(), process_cpu_seconds(self.router_pid),
                sum(process_cpu_seconds(pid) for pid in self.worker_pids), time.process_time())

    @staticmethod
    def shares(a: tuple, b: tuple) -> dict[str, float]:
        """Each as a share of one core over the wall time between the samples."""
        wall = b[0] - a[0]
        return {"wall_s": wall, "router": (b[1] - a[1]) / wall, "workers": (b[2] - a[2]) / wall,
                "client": (b[3] - a[3]) / wall}


@dataclass
class Cluster:
    """The processes of one ITL (a simulated worker's timing is fixed at start)."""

    router: RouterProcess
    prefill: str
    decode: str
    meter: CpuMeter


@contextlib.contextmanager
def start_cluster(args, model_dir: Path, itl_ms: float, vocab: int, cores: Cores | None) -> Iterator[Cluster]:
    sim = ["--ttft-ms", str(args.ttft_ms), "--itl-ms", str(itl_ms), "--vocab-size", str(vocab)]
    procs = []
    try:
        for _ in range(2):
            procs.append(start_worker("simulated", model_dir, cpus=str(cores.workers) if cores else None, threads=1,
                                      extra=sim))
        prefill, decode = procs[0].address, procs[1].address
        router = start_router(model_dir, MODEL_NAME, prefill, decode, cpus=str(cores.router) if cores else None,
                              loop=args.loop, http=args.http, tune_gc=args.tune_gc, profile=args.profile,
                              env=dict(item.split("=", 1) for item in args.router_env))
        procs.append(router)
        yield Cluster(router, prefill, decode, CpuMeter(router.proc.pid, [w.proc.pid for w in procs[:2]]))
    finally:
        for proc in reversed(procs):
            proc.stop()


def stream_seconds(setup: Setup, args) -> float:
    return args.ttft_ms / 1e3 + setup.max_tokens * setup.itl_s


async def run_once(n: int, rate: float, args, one, gauge: Gauge, meter: CpuMeter,
                   ) -> tuple[list[StreamRecord], dict]:
    """Hold n streams of one kind; returns the records and the window: (start, end), CPU shares, held."""
    t0 = time.perf_counter()
    window = (t0 + n / rate + args.settle, t0 + n / rate + args.settle + args.hold)
    held: list[int] = []
    info: dict = {}

    async def watch() -> None:
        await asyncio.sleep(window[0] - time.perf_counter())
        before = meter.sample()
        while time.perf_counter() < window[1]:
            held.append(gauge.now)
            await asyncio.sleep(0.05)
        info["cpu"] = CpuMeter.shares(before, meter.sample())

    watcher = asyncio.create_task(watch())
    records = await hold(n, rate, window[1], args.stream_timeout, one)
    await watcher
    info.update(window=window, held_min=min(held, default=0), held_peak=gauge.peak)
    return records, info


async def one_step(n: int, args, cluster: Cluster, stubs, setup: Setup, cores: Cores | None) -> dict:
    rate = args.ramp or n / stream_seconds(setup, args)
    result = {"n": n, "itl_ms": setup.itl_s * 1e3, "max_tokens": setup.max_tokens, "new_streams_per_s": rate}
    for kind in ("direct", "router"):
        if cores is not None:
            pin_threads(cores.client(kind))
        gauge = Gauge()
        if kind == "direct":
            one, close = direct_stream(*stubs, setup.prompt_ids, setup.max_tokens, gauge), (lambda: None)
        else:
            request = completion_request(cluster.router.address, MODEL_NAME, PROMPT, setup.max_tokens)
            one, close = router_stream(cluster.router.address, request, gauge, n)
        records, info = await run_once(n, rate, args, one, gauge, cluster.meter)
        close()
        make = direct_result if kind == "direct" else router_result
        stats = window_stats([make(r, setup) for r in records], info["window"], setup)
        stats.held_min, stats.held_peak, stats.cpu = info["held_min"], info["held_peak"], info["cpu"]
        result[kind] = stats.summary()
        await asyncio.sleep(1.0)  # streams cut at the deadline finish unwinding on the servers
    d, r = result["direct"], result["router"]
    for name in ("ttft", "delay", "itl"):
        for q in ("p50", "p99"):
            result[f"added_{name}_{q}"] = r[f"{name}_{q}"] - d[f"{name}_{q}"]
    wall = r["cpu"]["wall_s"]
    result["tokens_per_s"] = r["num_tokens"] / wall
    result["router_us_per_token"] = 1e6 * r["cpu"]["router"] * wall / r["num_tokens"] if r["num_tokens"] else None
    return result


async def run_steps(steps: list[int], args, cluster: Cluster, setup: Setup, cores: Cores | None,
                    deadline: float, is_sweep: bool) -> list[dict]:
    results = []
    async with (grpc.aio.insecure_channel(cluster.prefill) as p_ch, grpc.aio.insecure_channel(cluster.decode) as d_ch):
        stubs = (pb_grpc.WorkerStub(p_ch), pb_grpc.WorkerStub(d_ch))
        warm = argparse.Namespace(**{**vars(args), "hold": 1.0, "settle": 0.2, "ramp": 50.0})
        await one_step(min(8, steps[0]), warm, cluster, stubs, setup, cores)  # connections, imports
        for n in steps:
            if time.monotonic() > deadline:
                print(f"time budget of {args.max_seconds:g}s spent: N={n} at ITL {setup.itl_s * 1e3:g} ms skipped")
                break
            result = await one_step(n, args, cluster, stubs, setup, cores)
            print(_row(result), flush=True)
            results.append(result)
            if is_sweep and is_saturated(result):
                break
    return results


def is_saturated(result: dict) -> bool:
    return result["router"]["errors"] > 0 or result["added_ttft_p50"] * 1e3 > SATURATED_MS


def workloads(args) -> list[tuple[float, list[int]]]:
    """(ITL in ms, the N of each step): the ramp over N, then the ITL sweep at the largest N."""
    return [(args.itl_ms, args.steps), *((itl, [max(args.steps)]) for itl in args.itl_sweep)]


def max_tokens_for(itl_ms: float, args) -> int:
    return args.max_tokens or max(2, round(args.stream_seconds * 1e3 / itl_ms))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _pair(res: dict, name: str) -> str:
    return f"{_ms(res[f'{name}_p50'])} / {_ms(res[f'{name}_p99'])}"


def _row(res: dict) -> str:
    d, r = res["direct"], res["router"]
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors_by_type"].items())) or "0"
    if d["errors"]:
        errors += f" (direct: {d['errors']})"
    cpu, per_token = r["cpu"], res["router_us_per_token"]
    return (f"| {res['n']} | {res['itl_ms']:g} | {res['new_streams_per_s']:.0f} | {r['completed']} + {r['cut']} "
            f"| {r['held_min']} / {r['held_peak']} | {errors} "
            f"| {_pair(r, 'ttft')} | {_pair(d, 'ttft')} | **{_pair(res, 'added_ttft')}** "
            f"| **{_pair(res, 'added_delay')}** | {_pair(r, 'itl')} | {_pair(d, 'itl')} "
            f"| {res['tokens_per_s']:.0f} | {100 * cpu['router']:.0f} % | {per_token or float('nan'):.0f} "
            f"| {100 * (cpu['workers'] + cpu['client']):.0f} % |")


def render(results: list[dict], args, cores: int) -> str:
    flags = f" --ramp {args.ramp:g}" if args.ramp else ""
    flags += f" --max-tokens {args.max_tokens}" if args.max_tokens else f" --stream-seconds {args.stream_seconds:g}"
    flags += "".join(f" --{name} {value}" for name, value, default in
                     (("loop", args.loop, "uvloop"), ("http", args.http, "httptools")) if value != default)
    flags += "" if args.tune_gc else " --no-tune-gc"
    flags += "".join(f" --router-env {item}" for item in args.router_env)
    sweep = ",".join(f"{itl:g}" for itl in args.itl_sweep) or '""'
    lines = [
        f"Date: {datetime.date.today()} · {cores} cores · simulated prefill + decode workers on core 1 (TTFT "
        f"{args.ttft_ms:g} ms, then one token per ITL; streams of ~{args.stream_seconds:g} s) · the router alone on "
        f"core 0 (one uvicorn process: {args.loop}, {args.http}, collector {'tuned' if args.tune_gc else 'at defaults'}) · "
        f"the client on core 1 for the router "
        f"run, on core 0 for the direct one · N streams held, new ones at N / stream duration per second (ramp and "
        f"steady state alike), measured over {args.hold:g} s once all N are up · command: `python -m "
        f"loadtest.router_capacity --steps {','.join(map(str, args.steps))} --itl-ms {args.itl_ms:g} "
        f"--itl-sweep {sweep} --ttft-ms {args.ttft_ms:g} --hold {args.hold:g}{flags}`",
        "",
        "Added = via the router − straight to the workers over gRPC (the router's own call sequence, same N, same "
        "schedule), percentile by percentile. TTFT: request sent → first token's text. Token delay: arrival − "
        "request sent − i·ITL for each token i ≥ 1, i.e. how late against the worker's schedule it reached the "
        "client. ITL: gap to the previous token when both came in chunks of their own (tokens the detokenizer "
        "holds back inside a UTF-8 character are left out of these, and counted below). Streams: completed + cut "
        "at the window's end (not errors); held: streams open during the window, min / peak. Tokens/s through "
        "the router in the window; router CPU as a share of its core, and per token relayed (new streams' cost "
        "included); core 1: workers + client during the router run. Target: 2,000 streams, zero errors, median "
        "added latency under 2 ms.",
        "",
        "| N | ITL (ms) | new streams/s | streams | held min / peak | errors | TTFT P50 / P99 via router (ms) "
        "| TTFT direct (ms) | added TTFT P50 / P99 (ms) | added token delay P50 / P99 (ms) "
        "| ITL P50 / P99 via router (ms) | ITL direct (ms) | tokens/s | router CPU | router µs / token "
        "| core 1 CPU |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_row(res) for res in results]
    held_back = sum(res["router"]["num_held_back"] for res in results)
    first_held = sum(res["router"]["num_first_held"] for res in results)
    lines += ["", f"Tokens held back by the detokenizer (left out of the delays): {held_back}; streams whose first "
                  f"token was (no TTFT): {first_held}.", "", verdict(results)]
    return "\n".join(lines)


def verdict(results: list[dict], target_n: int = 2000, target_ms: float = 2.0) -> str:
    """Against the target, so a reader need not work it out from the table."""
    at_n = [res for res in results if res["n"] >= target_n]
    if not at_n:
        return f"Target not reached: no step held {target_n} streams."

    def met(res: dict) -> bool:
        r = res["router"]
        return (r["errors"] == 0 and r["held_min"] >= target_n and res["added_ttft_p50"] * 1e3 < target_ms
                and res["added_delay_p50"] * 1e3 < target_ms)

    passing = [res for res in at_n if met(res)]
    # Met: the most tokens/s that still met it. Not met: the gentlest step, the nearest miss.
    rate = lambda res: res["tokens_per_s"]  # noqa: E731
    best = max(passing, key=rate) if passing else min(at_n, key=rate)
    r = best["router"]
    return (f"Target {'met' if passing else 'not met'} at N={best['n']}, ITL {best['itl_ms']:g} ms "
            f"({best['tokens_per_s']:.0f} tokens/s): {r['errors']} errors, {r['held_min']} streams held throughout "
            f"the window (peak {r['held_peak']}), median added TTFT {best['added_ttft_p50'] * 1e3:.2f} ms and token "
            f"delay {best['added_delay_p50'] * 1e3:.2f} ms (target < {target_ms:g} ms).")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint dir for the tokenizer (default: tiny, made in a temp dir)")
    parser.add_argument("--steps", type=_ints, default=[500, 1000, 2000], help="N streams held, one step each")
    parser.add_argument("--itl-ms", type=float, default=2000.0, help="the workers' ITL while N ramps up")
    parser.add_argument("--itl-sweep", type=_floats, default=[1000.0, 500.0, 250.0],
                        help="then these ITLs at the largest N, until the router saturates ('' for none)")
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--stream-seconds", type=float, default=15.0,
                        help="a stream's length: max_tokens = this / ITL (new streams/s = N / this)")
    parser.add_argument("--max-tokens", type=int, help="instead of --stream-seconds")
    parser.add_argument("--ramp", type=float, help="new streams per second (default: N / a stream's duration)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after the ramp before the window")
    parser.add_argument("--hold", type=float, default=8.0, help="seconds measured with N streams held")
    parser.add_argument("--stream-timeout", type=float, default=120.0, help="seconds one stream may take")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="no new step starts after this")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="the router's event loop")
    parser.add_argument("--http", choices=("httptools", "h11"), default="httptools", help="the router's HTTP")
    parser.add_argument("--no-tune-gc", dest="tune_gc", action="store_false",
                        help="the router's garbage collector at Python's defaults")
    parser.add_argument("--router-env", action="append", default=[], metavar="NAME=VALUE",
                        help="set in the router's environment (e.g. GRPC_EXPERIMENTS=...); repeatable")
    parser.add_argument("--profile", type=Path, help="cProfile the router into this file (slows it)")
    parser.add_argument("--write", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    raise_fd_limit()
    num_cores = os.cpu_count() or 1
    cores = Cores() if num_cores >= 2 else None
    deadline = time.monotonic() + args.max_seconds
    results: list[dict] = []
    affinity = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from cluster.model.presets import make_model

            model_dir = make_model("tiny", Path(tmp) / "tiny")
        tokenizer = Tokenizer.from_dir(model_dir)
        vocab = min(tokenizer.vocab_size, json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
        try:
            for group, (itl_ms, steps) in enumerate(workloads(args)):
                if group and (not results or is_saturated(results[-1])):
                    break  # the sweep goes faster only while the last step kept up
                setup = Setup(tokenizer, tokenizer.encode(PROMPT), max_tokens_for(itl_ms, args), vocab, itl_ms / 1e3)
                with start_cluster(args, model_dir, itl_ms, vocab, cores) as cluster:
                    results += _run_loop(run_steps(steps, args, cluster, setup, cores, deadline, is_sweep=group > 0))
        finally:
            pin_threads(affinity)
    body = render(results, args, num_cores)
    print(body)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.write:
        write_section(args.write, "router-capacity", "Router capacity (simulated workers)", body)
    return results


def _run_loop(coro):
    """The client on uvloop too: its timers and socket callbacks cost less, leaving core 1 to the workers."""
    import uvloop

    return uvloop.run(coro)


if __name__ == "__main__":
    main()
