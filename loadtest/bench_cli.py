"""`python -m loadtest` / `pdserve bench`: a serving benchmark for any OpenAI-compatible endpoint and
pdserve's gRPC API.

    python -m loadtest --base-url http://127.0.0.1:8000 --model tiny --tokenizer models/tiny \\
        --input-len 256 --output-len 128 --rate 4 --num-requests 200 --slo ttft=0.5,tpot=0.05
    python -m loadtest --backend grpc --grpc-target 127.0.0.1:50051 --concurrency 16 --duration 60
    python -m loadtest --workload shared-prefix --num-prefixes 4 --prefix-len 1024 --sweep rate=1,2,4,8 \\
        --plot-dir plots/
    python -m loadtest --compare before.json after.json

Every run is bounded by a request count and a duration, whichever comes first. Figures follow
vLLM's benchmark definitions (loadtest/record.py, loadtest/measure.py). The result file
(loadtest/results.py) holds the config (never the API key), the machine, the date and every request.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import sys
from pathlib import Path

from loadtest import arrival as arrival_mod
from loadtest import backends, workload
from loadtest.arrival import Arrival
from loadtest.backends import BackendConfig, RequestError
from loadtest.bench import PROMPT_FORMATS, BenchConfig, run_bench, write_plots
from loadtest.compare import compare_docs, pair_runs
from loadtest.measure import SLO
from loadtest.runner import Bounds
from loadtest.sweep import Sweep
from loadtest.workload import WorkloadConfig


def parser(prog: str = "python -m loadtest") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group("target")
    t.add_argument("--backend", choices=backends.KINDS, default="openai",
                   help="openai: /v1/completions; openai-chat: /v1/chat/completions; grpc(-chat): pdserve.v1 Generate")
    t.add_argument("--base-url", default="http://127.0.0.1:8000", help="the OpenAI-compatible server")
    t.add_argument("--endpoint", default=None, help="path under --base-url (default by --backend)")
    t.add_argument("--grpc-target", default="127.0.0.1:50051", help="host:port of pdserve's gRPC API")
    t.add_argument("--model", default=None, help="model name to request (default: the first the server lists)")
    t.add_argument("--api-key", default=None, help="Bearer key (default: $PDSERVE_API_KEY or $OPENAI_API_KEY); never saved")
    t.add_argument("--tokenizer", type=Path, default=None,
                   help="the served model's directory (tokenizer.json): exact prompt lengths, token-id prompts")
    t.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                   help="completions/gRPC prompts as token ids or text (auto: ids when the server takes them)")
    t.add_argument("--temperature", type=float, default=0.0)
    t.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let the model stop early (default: ignore_eos, so outputs are as long as asked)")
    t.add_argument("--extra-body", default=None, help="JSON object merged into every OpenAI request body")
    t.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")

    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=workload.KINDS, default="random")
    w.add_argument("--input-len", default="256", help="N, uniform:LO:HI, normal:MEAN:STD or lognormal:MEAN:SIGMA")
    w.add_argument("--output-len", default="128", help="as --input-len: the max_tokens asked")
    w.add_argument("--max-input-len", type=int, default=None, help="cap on drawn input lengths")
    w.add_argument("--max-output-len", type=int, default=None, help="cap on drawn output lengths")
    w.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: groups (one system prompt each)")
    w.add_argument("--prefix-len", default="1024", help="shared-prefix: each group's system prompt length")
    w.add_argument("--num-turns", default="4", help="multi-turn: turns per session (a length spec)")
    w.add_argument("--num-sessions", type=int, default=8, help="multi-turn: sessions open at once")
    w.add_argument("--dataset", type=Path, default=None, help="jsonl: one prompt, prompt_token_ids or messages a line")
    w.add_argument("--seed", type=int, default=0)

    a = p.add_argument_group("arrivals and bounds")
    a.add_argument("--arrival", choices=[k for k in arrival_mod.KINDS if k != "closed"], default="poisson")
    a.add_argument("--rate", type=float, default=math.inf, help="requests/s (default inf: all at once)")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: <1 burstier, 1 Poisson, >1 steadier")
    a.add_argument("--concurrency", type=int, default=None, help="closed loop with this many users (ignores --rate)")
    a.add_argument("--max-concurrency", type=int, default=0, help="cap on requests in flight (open loop)")
    a.add_argument("--num-requests", type=int, default=200, help="at most this many requests")
    a.add_argument("--duration", type=float, default=600.0, help="at most this many seconds of sending")
    a.add_argument("--grace", type=float, default=30.0, help="seconds requests in flight may finish after --duration")
    a.add_argument("--warmup", type=int, default=0, help="requests sent one by one first, not measured")

    r = p.add_argument_group("results")
    r.add_argument("--slo", default=None, help="goodput bounds, e.g. ttft=0.5,tpot=0.05,e2e=10 (seconds, or 500ms)")
    r.add_argument("--sweep", default=None, help="e.g. rate=1,2,4,8 or concurrency=1,4,16: one run per value")
    r.add_argument("--result", type=Path, default=None, help="JSON result file (default bench-results/<time>.json)")
    r.add_argument("--no-result", action="store_true", help="write no result file")
    r.add_argument("--plot-dir", type=Path, default=None, help="write latency CDFs (and the sweep curve) as PNGs here")
    r.add_argument("--label", default="", help="name of this run in tables and plots")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    r.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                   help="print two result files' figures side by side with B/A, and run nothing")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """ValueError names the flag's field on any bad value."""
    extra = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except json.JSONDecodeError as exc:
            raise ValueError(f"extra_body: not JSON ({exc.msg})") from None
        if not isinstance(extra, dict):
            raise ValueError("extra_body: must be a JSON object")
    api_key = args.api_key or os.environ.get("PDSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    backend = BackendConfig(kind=args.backend, base_url=args.base_url, endpoint=args.endpoint,
                            grpc_target=args.grpc_target, model=args.model, api_key=api_key,
                            ignore_eos=args.ignore_eos, temperature=args.temperature, extra_body=extra,
                            timeout_s=args.timeout)
    work = WorkloadConfig(kind=args.workload, input_len=args.input_len, output_len=args.output_len,
                          num_prefixes=args.num_prefixes, prefix_len=args.prefix_len, num_turns=args.num_turns,
                          num_sessions=args.num_sessions, dataset=args.dataset, max_input_len=args.max_input_len,
                          max_output_len=args.max_output_len, seed=args.seed)
    if args.concurrency is not None:
        arrival = Arrival("closed", concurrency=args.concurrency)
    else:
        arrival = Arrival(args.arrival, rate=args.rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency)
    bounds = Bounds(num_requests=args.num_requests, duration_s=args.duration, grace_s=args.grace, timeout_s=args.timeout)
    result = None
    if not args.no_result:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
        result = args.result or Path("bench-results") / f"{stamp}{'-' + args.label if args.label else ''}.json"
    return BenchConfig(backend=backend, workload=work, arrival=arrival, bounds=bounds, tokenizer=args.tokenizer,
                       prompt_format=args.prompt_format, slo=SLO.parse(args.slo) if args.slo else None,
                       sweep=Sweep.parse(args.sweep) if args.sweep else None, warmup=args.warmup, result=result,
                       plot_dir=args.plot_dir, is_progress=args.progress, label=args.label)


def main(argv: list[str] | None = None, prog: str = "python -m loadtest") -> int:
    p = parser(prog)
    args = p.parse_args(argv)
    if args.compare:
        return _compare(args)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        p.error(str(exc))
    try:
        doc = asyncio.run(run_bench(config))
    except (ValueError, RequestError) as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    # A run where nothing completed is a failure (a server down, a wrong model name): say so in the status.
    return 0 if any(run["summary"]["num_completed"] for run in doc["runs"]) else 1


def _compare(args: argparse.Namespace) -> int:
    from loadtest import results

    try:
        a, b = (results.read(path) for path in args.compare)
        print(compare_docs(a, b, tuple(str(path) for path in args.compare)))
        if args.plot_dir is not None:
            run_a, run_b = pair_runs(a, b)[0]
            overlay = {"runs": [{**run_a, "label": f"A {run_a['label']}"}, {**run_b, "label": f"B {run_b['label']}"}]}
            for path in write_plots(overlay, args.plot_dir):
                print(f"plot: {path}")
    except ValueError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
