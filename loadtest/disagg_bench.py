"""Disaggregated vs unified serving on one machine, same workload, same run.

    python -m loadtest.disagg_bench [--num-requests 48 --rate 1.5] [--write BENCHMARKS.md]

Disaggregated: one prefill worker and one decode worker, each pinned to one core with one thread,
KV moving over gRPC. Unified: one worker on both cores with two threads. Both are driven through
their gRPC worker API by the same open-loop Poisson arrivals of a mixed workload: mostly chat-like
requests (short prompt, long answer) plus long prompts (documents) that arrive while others decode —
exactly what makes a colocated engine's decodes stall. Reported per system: TTFT P50/P99, inter-token
latency (gaps between streamed tokens) P50/P99, E2E P50, output tokens/s; then the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tqdm import tqdm

from cluster.protogen import ensure_generated
from cluster.request import SamplingParams
from cluster.worker.client import disaggregated_stream
from cluster.worker.convert import params_to_pb
from loadtest.report import write_section
from loadtest.workers import start_worker

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402


@dataclass
class Timing:
    send: float
    token_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.send

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass
class Item:
    prompt: list[int]
    max_tokens: int
    arrival: float


def make_workload(args, vocab: int) -> list[Item]:
    rng = random.Random(args.seed)
    items, t = [], 0.0
    for _ in range(args.num_requests):
        t += rng.expovariate(args.rate)
        is_long = rng.random() < args.long_fraction
        n_in = args.long_input_len if is_long else args.input_len
        n_out = args.long_output_len if is_long else args.output_len
        items.append(Item([rng.randrange(16, vocab) for _ in range(n_in)], n_out, t))
    return items


def run_disaggregated(prefill_addr: str, decode_addr: str, items: list[Item]) -> list[Timing]:
    with grpc.insecure_channel(prefill_addr) as p_ch, grpc.insecure_channel(decode_addr) as d_ch:
        prefill, decode = pb_grpc.WorkerStub(p_ch), pb_grpc.WorkerStub(d_ch)

        def one(i: int, item: Item, timing: Timing) -> None:
            params = SamplingParams(max_tokens=item.max_tokens, temperature=0.0, ignore_eos=True)
            for event in disaggregated_stream(prefill, decode, f"d{i}", item.prompt, params):
                now = time.perf_counter()
                timing.token_times.extend([now] * len(event.token_ids))

        return drive(items, one)


def run_unified(address: str, items: list[Item]) -> list[Timing]:
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.WorkerStub(ch)

        def one(i: int, item: Item, timing: Timing) -> None:
            params = params_to_pb(SamplingParams(max_tokens=item.max_tokens, temperature=0.0, ignore_eos=True))
            for chunk in stub.Decode(pb.DecodeRequest(request_id=f"u{i}", prompt_token_ids=item.prompt,
                                                      sampling_params=params), timeout=600):
                now = time.perf_counter()
                timing.token_times.extend([now] * len(chunk.token_ids))

        return drive(items, one)


def drive(items: list[Item], one) -> list[Timing]:
    """Open loop: each request starts at its arrival time whatever the others are doing."""
    timings = [Timing(0.0) for _ in items]
    bar = tqdm(total=len(items), unit="req", leave=False)
    lock = threading.Lock()
    start = time.perf_counter()

    def task(i: int) -> None:
        delay = start + items[i].arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        timings[i].send = time.perf_counter()
        try:
            one(i, items[i], timings[i])
        except grpc.RpcError as exc:
            timings[i].error = exc.code().name
        with lock:
            bar.update(1)

    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        list(pool.map(task, range(len(items))))
    bar.close()
    return timings


def summarize(timings: list[Timing]) -> dict:
    ok = [t for t in timings if t.error is None and t.token_times]
    ttfts = sorted(t.ttft for t in ok)
    gaps = sorted(g for t in ok for g in t.gaps)
    first, last = min(t.send for t in ok), max(t.token_times[-1] for t in ok)
    return {
        "completed": len(ok), "errors": len(timings) - len(ok),
        "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99),
        "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99),
        "e2e_p50": statistics.median(t.token_times[-1] - t.send for t in ok),
        "output_tok_s": sum(len(t.token_times) for t in ok) / (last - first),
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def render(results: dict, args) -> str:
    d, u = results["disaggregated"], results["unified"]
    rows = [("TTFT P50 (s)", "ttft_p50", False), ("TTFT P99 (s)", "ttft_p99", False),
            ("ITL P50 (ms)", "itl_p50", True), ("ITL P99 (ms)", "itl_p99", True),
            ("E2E P50 (s)", "e2e_p50", False), ("output tok/s", "output_tok_s", False)]
    lines = [
        f"Date: {datetime.date.today()} · model: {args.model} · {args.num_requests} requests, Poisson "
        f"{args.rate}/s, {int(args.long_fraction * 100)}% long ({args.long_input_len} in / {args.long_output_len} out), "
        f"the rest {args.input_len} in / {args.output_len} out, greedy, ignore_eos · command: "
        f"`python -m loadtest.disagg_bench --num-requests {args.num_requests} --rate {args.rate}`",
        "",
        "Disaggregated = 1 prefill + 1 decode worker, one core and one thread each, KV over gRPC; "
        "unified = 1 worker, two cores, two threads.",
        "",
        "| metric | disaggregated | unified | unified / disaggregated |",
        "|---|---:|---:|---:|",
    ]
    for label, key, ms in rows:
        scale = 1000 if ms else 1
        ratio = u[key] / d[key] if d[key] else float("nan")
        lines.append(f"| {label} | {d[key] * scale:.3g} | {u[key] * scale:.3g} | {ratio:.2f} |")
    lines.append(f"| completed / errors | {d['completed']} / {d['errors']} | {u['completed']} / {u['errors']} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/small"))
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=1.5, help="mean arrivals per second (Poisson)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--long-input-len", type=int, default=1536)
    parser.add_argument("--long-output-len", type=int, default=16)
    parser.add_argument("--long-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not (args.model / "config.json").exists():
        from cluster.model.presets import make_model

        make_model("small", args.model)
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    items = make_workload(args, vocab)
    extra = ["--dtype", "float32"]

    results = {}
    workers = [start_worker("prefill", args.model, cpus="0", threads=1, extra=extra),
               start_worker("decode", args.model, cpus="1", threads=1, extra=extra)]
    try:
        print("disaggregated ...")
        results["disaggregated"] = summarize(run_disaggregated(workers[0].address, workers[1].address, items))
    finally:
        for w in workers:
            w.stop()
    unified = start_worker("unified", args.model, cpus="0-1", threads=2, extra=extra)
    try:
        print("unified ...")
        results["unified"] = summarize(run_unified(unified.address, items))
    finally:
        unified.stop()
    body = render(results, args)
    print(body)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.write:
        write_section(args.write, "disagg-bench", "Disaggregated vs unified (mixed workload)", body)


if __name__ == "__main__":
    main()
