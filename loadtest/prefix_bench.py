"""Prefix caching on vs off, on a workload where 90 % of every prompt is a shared system prompt.

    python -m loadtest.prefix_bench [--num-requests 32 --rate 0.5] [--write BENCHMARKS.md]

Two unified workers on the same cores with the same threads — one as it ships, one started with
`--no-prefix-caching` — each registered under its own model name in one cluster (loadtest/
bench_cluster.py: embedded Redis, the router process in front), driven one after the other with the
same requests at the same Poisson times by the loadtest tool: `--num-prefixes` groups, each behind
its own `--prefix-len`-token system prompt, followed by `--input-len` tokens of the request's own
(1800 + 200: 90 % shared), `--output-len` tokens out, ignore_eos, token-id prompts of exact length. Each worker is warmed up first with one
request as long as the workload's, of tokens no workload request shares.

Reported per run: TTFT P50/P99, E2E P50, output tokens/s and requests/s, and the prefix-cache hit
rate over the run (cached prompt tokens / prompt tokens looked up, from the worker's Stats RPC,
counted from after the warm-up); then off / on for each. The first request of each group finds
nothing cached even with caching on, so TTFT P99 with caching is a miss unless the run is long.
Target (issue 6): TTFT at least 5x lower with caching on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from pathlib import Path

from loadtest.arrival import Arrival
from loadtest.bench_cluster import BenchCluster, WorkerSpec, drive, hit_rate, stats_delta
from loadtest.report import write_section
from loadtest.workload import WorkloadConfig

SYSTEMS = ("off", "on")  # prefix caching


def run(args: argparse.Namespace) -> dict:
    """Both systems in one cluster: a worker per system, each its own served model behind one router,
    driven one after the other (the idle one only heartbeats)."""
    specs = []
    for system in SYSTEMS:
        extra = [] if system == "on" else ["--no-prefix-caching"]
        if args.num_kv_blocks is not None:
            extra += ["--num-kv-blocks", str(args.num_kv_blocks)]
        specs.append(WorkerSpec("unified", cpus=args.cpus, threads=args.threads, extra=tuple(extra),
                                served_name=f"caching-{system}"))
    cluster = BenchCluster(args.model, specs, dtype=args.dtype).start()
    results = {}
    try:
        cluster.warm_up(num_tokens=args.prefix_len + args.input_len)
        for system, spec in zip(SYSTEMS, specs, strict=True):
            print(f"prefix caching {system} ...", flush=True)
            before = cluster.stats()
            summary = drive(cluster.urls["default"], spec.served_name, args.model, workload(args),
                            Arrival("poisson", rate=args.rate), args.num_requests, label=spec.served_name,
                            progress=args.progress)
            stats = [s for s in stats_delta(cluster.stats(), before) if s.served_name == spec.served_name]
            results[system] = {"summary": summary, "hit_rate": hit_rate(stats),
                               "prefix_cache_hits": sum(s.prefix_cache_hits for s in stats),
                               "prefix_cache_queries": sum(s.prefix_cache_queries for s in stats)}
    finally:
        cluster.stop()
    return results


def workload(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(kind="shared-prefix", input_len=str(args.input_len), output_len=str(args.output_len),
                          num_prefixes=args.num_prefixes, prefix_len=str(args.prefix_len), seed=args.seed)


ROWS = (  # label, figure, scale
    ("TTFT P50 (ms)", ("ttft", "p50"), 1000), ("TTFT P99 (ms)", ("ttft", "p99"), 1000),
    ("E2E P50 (s)", ("e2e", "p50"), 1), ("output tok/s", ("output_throughput",), 1),
    ("requests/s", ("request_throughput",), 1),
)


def num(x: float) -> str:
    """A figure for a table: whole numbers from 100 up, three significant digits below."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def figure(summary: dict, path: tuple[str, ...]) -> float:
    value = summary
    for key in path:
        value = value[key]
    return math.nan if value is None else float(value)


def render(results: dict, args: argparse.Namespace) -> str:
    off, on = results["off"], results["on"]
    shared = args.prefix_len / (args.prefix_len + args.input_len)
    lines = [
        f"Date: {datetime.date.today()} · machine: {platform.machine()}, {args.note} · model: {args.model} "
        f"({args.dtype}) · a unified worker per system, cores {args.cpus or 'any'}, {args.threads} thread(s), behind "
        f"the router (run one after the other) · "
        f"{args.num_requests} requests, Poisson {args.rate:g}/s, {args.num_prefixes} shared system prompts of "
        f"{args.prefix_len} tokens + {args.input_len} own tokens ({shared:.0%} shared), {args.output_len} out, greedy, "
        f"ignore_eos · command: `{command(args)}`",
        "",
        "| metric | caching off | caching on | off / on |",
        "|---|---:|---:|---:|",
    ]
    for label, path, scale in ROWS:
        a, b = figure(off["summary"], path) * scale, figure(on["summary"], path) * scale
        lines.append(f"| {label} | {num(a)} | {num(b)} | {a / b if b else math.nan:.2f} |")
    lines.append(f"| prefix-cache hit rate (tokens) | {off['hit_rate']:.1%} | {on['hit_rate']:.1%} | |")
    lines.append("| completed / errors | " + " | ".join(
        f"{r['summary']['num_completed']} / {r['summary']['num_failed']}" for r in (off, on)) + " | |")
    ratio = figure(off["summary"], ("ttft", "p50")) / figure(on["summary"], ("ttft", "p50"))
    verdict = "met" if ratio >= 5 else "not met"
    lines += ["", f"Target (TTFT at least 5x lower with caching on): {verdict} at P50, {ratio:.1f}x."]
    return "\n".join(lines)


def command(args: argparse.Namespace) -> str:
    flags = [f"--num-requests {args.num_requests}", f"--rate {args.rate:g}", f"--num-prefixes {args.num_prefixes}",
             f"--prefix-len {args.prefix_len}", f"--input-len {args.input_len}", f"--output-len {args.output_len}"]
    return "python -m loadtest.prefix_bench " + " ".join(flags)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/small"), help="made with the small preset if missing")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cpus", default="0-1", help="the worker's cores (taskset list; '' = unpinned)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="the worker's KV blocks (default: its own)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=0.5, help="Poisson arrivals per second")
    p.add_argument("--num-prefixes", type=int, default=4, help="groups, each with its own system prompt")
    p.add_argument("--prefix-len", type=int, default=1800, help="tokens of each group's system prompt")
    p.add_argument("--input-len", type=int, default=200, help="tokens of each request's own")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="2 cores", help="said of the machine in the table's header")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--json", type=Path, help="write both runs' summaries and hit rates here")
    p.add_argument("--write", type=Path, help="rewrite this file's prefix-cache section (BENCHMARKS.md)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    args.cpus = args.cpus or None
    if not (args.model / "config.json").exists():
        from cluster.model.presets import make_model

        make_model("small", args.model)
    results = run(args)
    body = render(results, args)
    print(body)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.write:
        write_section(args.write, "prefix-cache", "Prefix cache on vs off (shared-prefix workload)", body)
    return results


if __name__ == "__main__":
    main()
