"""Router capacity on simulated workers: concurrent SSE streams one router process holds, and the
latency it adds on top of the workers.

    python -m loadtest.router_capacity [--steps 250,500,1000,2000] [--write BENCHMARKS.md] [--json r.json]

Setup: a simulated prefill and a simulated decode worker (no model, tokens on timers) pinned to core 1,
the router (one uvicorn process, loadtest/router_serve.py) pinned to core 0, the tiny model's tokenizer
so the router detokenizes real ids. For each N in the ramp, N streams start at once from one asyncio
client: first straight to the workers over gRPC (the router's own Decode(expect_kv) → Prefill → decode
stream sequence: the baseline), then as streaming /v1/completions through the router (httpx, HTTP/1.1,
a fresh connection per stream). Added latency = router − direct, per percentile, for TTFT and for the
gaps between streamed chunks. The ramp stops early once --max-seconds is spent.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import grpc
import httpx
from tqdm import tqdm

from cluster.model.tokenizer import Tokenizer
from cluster.protogen import ensure_generated
from loadtest.disagg_bench import pct
from loadtest.report import write_section
from loadtest.router_serve import raise_fd_limit, start_router
from loadtest.stream_clients import StreamTiming, direct_stream, router_stream, run_streams
from loadtest.workers import start_worker

ensure_generated()
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

MODEL_NAME = "tiny"
PROMPT = "Explain why a serving system splits prefill from decode."


def summarize(timings: list[StreamTiming], peak: int) -> dict:
    ok = [t for t in timings if t.error is None and t.chunk_times]
    ttfts = sorted(t.ttft for t in ok)
    gaps = sorted(g for t in ok for g in t.gaps)
    return {
        "streams": len(timings), "completed": len(ok), "errors": len(timings) - len(ok),
        "errors_by_type": dict(collections.Counter(t.error or "no_tokens" for t in timings if t not in ok)),
        "peak_streams": peak,
        "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99),
        "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99),
    }


async def one_step(n: int, args, router, stubs, prompt_ids: list[int]) -> dict:
    timeout, router_base = args.stream_timeout, f"http://{router.address}"
    bar = tqdm(total=2 * n, unit="stream", leave=False, desc=f"N={n}")
    direct, direct_peak = await run_streams(n, direct_stream(*stubs, prompt_ids, args.max_tokens), timeout,
                                            lambda: bar.update(1))
    await asyncio.sleep(0.5)  # let the workers settle between the two runs
    # A client per step: every stream opens its own connection, as many independent callers would.
    limits = httpx.Limits(max_connections=n + 16, max_keepalive_connections=n + 16)
    cpu = (router.cpu_seconds(), time.process_time(), time.perf_counter())
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, pool=None)) as client:
        via, via_peak = await run_streams(n, router_stream(client, router_base, MODEL_NAME, PROMPT, args.max_tokens),
                                          timeout, lambda: bar.update(1))
    # CPU seconds over the router run: a router near 1 CPU-second per wall second is saturated.
    usage = {"router_cpu_s": router.cpu_seconds() - cpu[0], "client_cpu_s": time.process_time() - cpu[1],
             "wall_s": time.perf_counter() - cpu[2]}
    bar.close()
    d, r = summarize(direct, direct_peak), summarize(via, via_peak)
    added = {f"added_{k}": r[k] - d[k] for k in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99")}
    return {"n": n, "direct": d, "router": r, **added, **usage}


async def ramp(args, router, prefill_addr: str, decode_addr: str, prompt_ids: list[int]) -> list[dict]:
    results = []
    async with grpc.aio.insecure_channel(prefill_addr) as p_ch, grpc.aio.insecure_channel(decode_addr) as d_ch:
        stubs = (pb_grpc.WorkerStub(p_ch), pb_grpc.WorkerStub(d_ch))
        await one_step(min(8, args.steps[0]), args, router, stubs, prompt_ids)  # warm-up: connections, imports
        start = time.monotonic()
        for n in args.steps:
            if time.monotonic() - start > args.max_seconds:
                print(f"time budget of {args.max_seconds}s spent: N={n} and above skipped")
                break
            result = await one_step(n, args, router, stubs, prompt_ids)
            print(_row(result))
            results.append(result)
            await asyncio.sleep(1.0)  # closed sockets drain before the next, larger step
    return results


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _row(res: dict) -> str:
    d, r = res["direct"], res["router"]
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors_by_type"].items())) or "0"
    if d["errors"]:
        errors += f" (direct: {d['errors']})"
    return (f"| {res['n']} | {r['completed']} | {r['peak_streams']} | {errors} "
            f"| {_ms(r['ttft_p50'])} / {_ms(r['ttft_p99'])} | {_ms(d['ttft_p50'])} / {_ms(d['ttft_p99'])} "
            f"| {_ms(res['added_ttft_p50'])} / {_ms(res['added_ttft_p99'])} "
            f"| {_ms(res['added_itl_p50'])} / {_ms(res['added_itl_p99'])} "
            f"| {res['router_cpu_s']:.1f} / {res['client_cpu_s']:.1f} / {res['wall_s']:.1f} |")


def render(results: list[dict], args, cores: int) -> str:
    steps = ",".join(map(str, args.steps))
    lines = [
        f"Date: {datetime.date.today()} · {cores} cores · simulated prefill + decode "
        f"worker (TTFT {args.ttft_ms:g} ms, ITL {args.itl_ms:g} ms) on core 1, the router (one uvicorn process, "
        f"asyncio loop, h11) on core 0, the client unpinned · {args.max_tokens} tokens per stream, all N "
        f"started at once · command: `python -m loadtest.router_capacity --steps {steps} "
        f"--max-tokens {args.max_tokens} --itl-ms {args.itl_ms:g}`",
        "",
        "Direct = the same N streams straight to the workers over gRPC (the router's own call sequence); "
        "added = router − direct at that percentile. ITL = gaps between streamed text chunks (a token the "
        "detokenizer holds back joins the next chunk, so a router gap can span two tokens). Target: 2,000 "
        "streams through one router process, zero errors, median added latency under 2 ms. The last column: "
        "CPU seconds the router process and the client used during the router run, and its wall time.",
        "",
        "| streams N | completed | peak held | errors | TTFT P50 / P99 via router (ms) | TTFT P50 / P99 direct (ms) "
        "| added TTFT P50 / P99 (ms) | added ITL P50 / P99 (ms) | CPU s router / client / wall s |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    lines += [_row(res) for res in results]
    return "\n".join([*lines, "", verdict(results)])


def verdict(results: list[dict], target_n: int = 2000, target_ms: float = 2.0) -> str:
    """One line against the target, so a reader need not work it out from the table."""
    top = max(results, key=lambda res: res["n"], default=None)
    if top is None or top["n"] < target_n:
        return f"Target not reached: the ramp stopped before {target_n} streams."
    r, added = top["router"], top["added_ttft_p50"] * 1000
    met = r["errors"] == 0 and added < target_ms
    return (f"Target {'met' if met else 'not met'} at N={top['n']}: {r['errors']} errors, "
            f"{r['peak_streams']} streams held at the peak, median added TTFT {added:.1f} ms "
            f"(target < {target_ms:g} ms).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint dir for the tokenizer (default: tiny, made in a temp dir)")
    parser.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[250, 500, 1000, 2000])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--itl-ms", type=float, default=50.0)
    parser.add_argument("--stream-timeout", type=float, default=60.0, help="seconds one stream may take")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="no new step starts after this")
    parser.add_argument("--write", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    raise_fd_limit()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from cluster.model.presets import make_model

            model_dir = make_model("tiny", Path(tmp) / "tiny")
        tokenizer = Tokenizer.from_dir(model_dir)
        vocab = min(tokenizer.vocab_size, json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
        cores = os.cpu_count() or 1
        pin_workers, pin_router = ("1", "0") if cores >= 2 else (None, None)
        sim = ["--ttft-ms", str(args.ttft_ms), "--itl-ms", str(args.itl_ms), "--vocab-size", str(vocab)]
        workers = [start_worker("simulated", model_dir, cpus=pin_workers, threads=1, extra=sim) for _ in range(2)]
        router = None
        try:
            router = start_router(model_dir, MODEL_NAME, workers[0].address, workers[1].address, cpus=pin_router)
            results = asyncio.run(ramp(args, router, workers[0].address, workers[1].address,
                                       tokenizer.encode(PROMPT)))
        finally:
            for proc in ([router] if router else []) + workers:
                proc.stop()
    body = render(results, args, cores)
    print(body)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.write:
        write_section(args.write, "router-capacity", "Router capacity (simulated workers)", body)


if __name__ == "__main__":
    main()
