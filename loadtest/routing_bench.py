"""Routing policies compared on a shared-prefix workload over several workers.

    python -m loadtest.routing_bench [--num-workers 4 --num-requests 40 --rate 1] [--write BENCHMARKS.md]

Setup (loadtest/bench_cluster.py): an embedded Redis; `--num-workers` unified workers of one thread
each, pinned round-robin over the machine's cores, each with a KV cache of `--num-kv-blocks` blocks —
room for about `--cache-prefixes` of the workload's system prompts besides the requests running, so
no worker can hold every group's prefix; and one router process per policy over those same workers
(prefill and decode policy both set to it where it applies: kv_aware is a decode policy only, its
prefill side least_loaded — unified workers are picked by the decode policy anyway).

Each policy in turn drives its router with the loadtest tool: `--num-requests` at Poisson
`--rate`, `--num-prefixes` groups behind their own `--prefix-len`-token system prompts (taken in
turn: keep the number of groups coprime with the number of workers, or round_robin sends each group
to the same worker every time by accident), `--input-len` own tokens, `--output-len` out, ignore_eos.
Policies run one after another on the same workers, so each policy's workload has its own random
tokens (same lengths and structure, seed + the policy's index): a later policy finds nothing it can
use in what an earlier one cached. Workers publish their prefix-cache contents with each heartbeat
(every 3 s), so prefix_aware routes a group's first requests on load alone.

Reported per policy: TTFT P50/P99, E2E P50, output tokens/s, the prefix-cache hit rate summed over
workers (cached prompt tokens / prompt tokens looked up, from each worker's Stats RPC over the run),
and how the run's prompt tokens spread over the workers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
from pathlib import Path

from cluster.router.config import DECODE_POLICIES, PREFILL_POLICIES
from loadtest.arrival import Arrival
from loadtest.bench_cluster import BenchCluster, RouterSpec, WorkerSpec, drive, hit_rate, stats_delta
from loadtest.report import write_section
from loadtest.workload import WorkloadConfig

BLOCK_SIZE = 16  # the engine's default KV block size (tokens)


def router_spec(policy: str) -> RouterSpec:
    return RouterSpec(prefill_policy=policy if policy in PREFILL_POLICIES else "least_loaded", decode_policy=policy)


def kv_blocks(args: argparse.Namespace) -> int:
    """Room for `cache_prefixes` system prompts plus `max_running` requests' own tokens."""
    prefix = math.ceil(args.prefix_len / BLOCK_SIZE)
    own = math.ceil((args.input_len + args.output_len) / BLOCK_SIZE) + 1
    return args.cache_prefixes * prefix + args.max_running * own


def worker_specs(args: argparse.Namespace) -> list[WorkerSpec]:
    cores = sorted(os.sched_getaffinity(0)) if args.pin else []
    extra = ("--num-kv-blocks", str(args.num_kv_blocks or kv_blocks(args)))
    return [WorkerSpec("unified", cpus=str(cores[i % len(cores)]) if cores else None, threads=args.threads, extra=extra)
            for i in range(args.num_workers)]


def run(args: argparse.Namespace) -> dict:
    cluster = BenchCluster(args.model, worker_specs(args), routers={p: router_spec(p) for p in args.policies},
                           dtype=args.dtype).start()
    results = {}
    try:
        cluster.warm_up(num_tokens=args.prefix_len + args.input_len)
        for k, policy in enumerate(args.policies):
            print(f"{policy} ...", flush=True)
            work = WorkloadConfig(kind="shared-prefix", input_len=str(args.input_len), output_len=str(args.output_len),
                                  num_prefixes=args.num_prefixes, prefix_len=str(args.prefix_len),
                                  seed=args.seed + 1000 * k)
            before = cluster.stats()
            summary = drive(cluster.urls[policy], cluster.served_names[0], args.model, work,
                            Arrival("poisson", rate=args.rate), args.num_requests, label=policy, progress=args.progress)
            stats = stats_delta(cluster.stats(), before)
            results[policy] = {"summary": summary, "hit_rate": hit_rate(stats),
                               "prompt_tokens_per_worker": [s.prefix_cache_queries for s in stats],
                               "cached_tokens_per_worker": [s.prefix_cache_hits for s in stats]}
    finally:
        cluster.stop()
    return results


def render(results: dict, args: argparse.Namespace) -> str:
    shared = args.prefix_len / (args.prefix_len + args.input_len)
    lines = [
        f"Date: {datetime.date.today()} · machine: {platform.machine()}, {args.note} · model: {args.model} "
        f"({args.dtype}) · {args.num_workers} unified workers, {args.threads} thread(s) each, "
        f"{'pinned round-robin over the cores' if args.pin else 'unpinned'}, "
        f"{args.num_kv_blocks or kv_blocks(args)} KV blocks each (room for ~{args.cache_prefixes} system prompts), one "
        f"router per policy, embedded Redis · {args.num_requests} requests per policy, Poisson {args.rate:g}/s, "
        f"{args.num_prefixes} system prompts of {args.prefix_len} tokens + {args.input_len} own ({shared:.0%} shared), "
        f"{args.output_len} out, greedy, ignore_eos · command: `{command(args)}`",
        "",
        "Hit rate = cached prompt tokens / prompt tokens looked up, summed over the workers; "
        "spread = each worker's share of the prompt tokens.",
        "",
        "| policy | TTFT P50 (ms) | TTFT P99 (ms) | E2E P50 (s) | output tok/s | prefix-cache hit rate | spread | "
        "completed / errors |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for policy, r in results.items():
        s = r["summary"]
        total = sum(r["prompt_tokens_per_worker"]) or 1
        spread = " / ".join(f"{q / total:.0%}" for q in r["prompt_tokens_per_worker"])
        lines.append(f"| {policy} | {s['ttft']['p50'] * 1000:.0f} | {s['ttft']['p99'] * 1000:.0f} | "
                     f"{s['e2e']['p50']:.2f} | {s['output_throughput']:.1f} | {r['hit_rate']:.1%} | {spread} | "
                     f"{s['num_completed']} / {s['num_failed']} |")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> str:
    flags = [f"--num-workers {args.num_workers}", f"--num-requests {args.num_requests}", f"--rate {args.rate:g}",
             f"--num-prefixes {args.num_prefixes}", f"--prefix-len {args.prefix_len}", f"--input-len {args.input_len}",
             f"--output-len {args.output_len}"]
    return "python -m loadtest.routing_bench " + " ".join(flags)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/small"), help="made with the small preset if missing")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="leave the workers unpinned")
    p.add_argument("--policies", default=",".join(DECODE_POLICIES), help="comma-separated, run in this order")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="per worker (default: from --cache-prefixes)")
    p.add_argument("--cache-prefixes", type=int, default=2, help="system prompts one worker's KV cache holds")
    p.add_argument("--max-running", type=int, default=8, help="requests' own tokens the KV cache also has room for")
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals per second")
    p.add_argument("--num-prefixes", type=int, default=7, help="groups (coprime with --num-workers)")
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="2 cores", help="said of the machine in the table's header")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--json", type=Path, help="write every policy's summary and hit rate here")
    p.add_argument("--write", type=Path, help="rewrite this file's routing-policies section (BENCHMARKS.md)")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    args.policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    unknown = [x for x in args.policies if x not in DECODE_POLICIES]
    if unknown or not args.policies:
        p.error(f"--policies: each must be one of {', '.join(DECODE_POLICIES)}, got {args.policies}")
    if args.num_workers < 1:
        p.error(f"--num-workers must be >= 1, got {args.num_workers}")
    if math.gcd(args.num_prefixes, args.num_workers) != 1:
        print(f"note: {args.num_prefixes} groups over {args.num_workers} workers: round_robin keeps each group on "
              "the same workers by accident (pick coprime numbers)", flush=True)
    if not (args.model / "config.json").exists():
        from cluster.model.presets import make_model

        make_model("small", args.model)
    results = run(args)
    body = render(results, args)
    print(body)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.write:
        write_section(args.write, "routing-policies", "Routing policies (shared-prefix workload, several workers)", body)
    return results


if __name__ == "__main__":
    main()
