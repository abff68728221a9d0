"""`pdserve` command line: make-model, generate, up.

    pdserve make-model --preset tiny models/tiny
    pdserve generate --model models/tiny --input prompts.jsonl --output results.jsonl
    pdserve up            # embedded defaults: tiny model (made if missing), local Ray, prefill + decode workers
    pdserve worker --role decode --model models/tiny     # one worker as a plain process
    pdserve worker --role simulated --ttft-ms 50 --itl-ms 10   # no model: tokens on a timer
    pdserve worker --role decode --model models/tiny --redis-url unix:///tmp/r.sock   # and register there
    pdserve status        # pools, workers, queue depths and KV usage, from the cluster's Redis
    pdserve scale tiny decode 3      # pin a pool at 3 replicas (the autoscaler holds it) ... --release to let go
    pdserve bench --base-url http://127.0.0.1:8000 --rate 4   # serving benchmark (python -m loadtest --help)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_DEFAULT_MODEL_DIR = Path("models/tiny")
_DEMO_PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "Disaggregated serving splits prefill and decode because",
    "def fibonacci(n):",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # a pass-through: loadtest/bench_cli.py owns every bench flag
        from loadtest.bench_cli import main as bench_main

        return bench_main(argv[1:], prog="pdserve bench")
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("make-model", help="write a random-weight HF checkpoint with a trained tokenizer")
    make.add_argument("out_dir", type=Path)
    make.add_argument("--preset", default="tiny")
    make.add_argument("--seed", type=int, default=0)

    gen = commands.add_parser("generate", help="offline generation over a JSONL file of prompts")
    _add_engine_args(gen)
    gen.add_argument("--input", type=Path, help='JSONL, one {"prompt": ...} (or "prompt_token_ids") a line')
    gen.add_argument("--output", type=Path, help="JSONL results (default: print)")
    _add_sampling_args(gen)

    up = commands.add_parser("up", help="bring the whole cluster up (embedded defaults, or --config FILE)")
    up.add_argument("--config", type=Path, default=None, help="cluster YAML (deploy/config/example.yaml)")
    up.add_argument("--model", type=Path, default=None,
                    help=f"serve this model directory (default: the config's, else {_DEFAULT_MODEL_DIR}, made if missing)")
    up.add_argument("--unified", action="store_true", help="colocated unified workers instead of prefill + decode")
    up.add_argument("--once", action="store_true", help="make one chat request through the router and exit")
    up.add_argument("--host", default=None, help="where the APIs listen (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=None, help="the OpenAI HTTP API (default 8000)")
    up.add_argument("--grpc-port", type=int, default=None, help="the gRPC API, serving.proto (default 50051)")
    engine = up.add_argument_group("engine", "override the config's engine section")
    engine.add_argument("--dtype", default=None)
    engine.add_argument("--max-num-seqs", type=int, default=None)
    engine.add_argument("--max-num-batched-tokens", type=int, default=None)
    engine.add_argument("--kv-cache-memory-gib", type=float, default=None)
    engine.add_argument("--attention-backend", default=None)

    worker = commands.add_parser("worker", help="run one worker (prefill, decode, unified or simulated) as a plain process")
    # --model is required, except by the simulated role: checked after parsing, below.
    _add_engine_args(worker, model_required=False)
    worker.set_defaults(model=None)
    worker.add_argument("--role", choices=["prefill", "decode", "unified", "simulated"], required=True)
    worker.add_argument("--host", default="127.0.0.1")
    worker.add_argument("--port", type=int, default=0, help="0 = any free port (printed as 'READY host:port')")
    worker.add_argument("--kv-transport", choices=["grpc", "dist", "local"], default="grpc")
    worker.add_argument("--num-kv-blocks", type=int, default=None)
    worker.add_argument("--threads", type=int, default=None)
    worker.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                        help="never reuse cached KV blocks across requests (the prefix-cache benchmark's baseline)")
    worker.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (ranks > 0 run as child processes)")
    worker.add_argument("--prefill-tp", type=int, default=1,
                        help="decode role: TP size of the prefill workers sending here, when a request doesn't say")
    worker.add_argument("--redis-url", default=None,
                        help="register in this Redis (redis://host:port or unix:///path) and heartbeat there")
    worker.add_argument("--served-model-name", default=None,
                        help="the model name clients and routers use (default: the model directory's name)")
    worker.add_argument("--registry-ttl", type=float, default=None,
                        help="seconds a worker stays listed without a heartbeat (default 10); beats every third")
    _add_simulated_args(worker)

    status = commands.add_parser("status", help="pools, workers, queue depths and KV usage, from the cluster's Redis")
    status.add_argument("--redis-url", default=None, help="default: redis_url in ./.pdserve/up.json (pdserve up writes it)")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    scale = commands.add_parser("scale", help="pin a pool's replica count (an autoscaler override) or --release it")
    scale.add_argument("model", help="served model name")
    scale.add_argument("pool", help="prefill | decode | unified")
    scale.add_argument("replicas", type=int, nargs="?", help="replicas to hold the pool at, until released")
    scale.add_argument("--release", action="store_true", help="drop the override: the policy decides again")
    scale.add_argument("--redis-url", default=None, help="default: redis_url in ./.pdserve/up.json (pdserve up writes it)")

    commands.add_parser("bench", add_help=False,  # listed for --help; main() hands its arguments on above
                        help="serving benchmark of an OpenAI-compatible or gRPC endpoint (pdserve bench --help)")

    args = parser.parse_args(argv)
    if args.command == "status":
        return _status(args)
    if args.command == "scale":
        if (args.replicas is None) != args.release:
            scale.error("give either REPLICAS or --release")
        from cluster.autoscale.cli import run_scale

        return run_scale(args.model, args.pool, args.replicas, args.redis_url)
    if args.command == "worker":
        if args.registry_ttl is not None and args.registry_ttl <= 0:
            worker.error(f"--registry-ttl must be > 0, got {args.registry_ttl}")
        if args.role == "simulated":
            return _simulated_worker(args)
        if args.model is None:
            worker.error("the following arguments are required: --model")
        return _worker(args)
    if args.command == "make-model":
        return _make_model(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "up":
        return _up(args)
    return 2


def _add_engine_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", type=Path, required=model_required, default=None if model_required else _DEFAULT_MODEL_DIR)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory-gib", type=float, default=2.0)
    p.add_argument("--attention-backend", default="auto")


def _add_simulated_args(p: argparse.ArgumentParser) -> None:
    sim = p.add_argument_group("simulated role", "no model: tokens on a timer (cluster/worker/simulated.py)")
    sim.add_argument("--ttft-ms", type=float, default=50.0, help="time to the first token")
    sim.add_argument("--itl-ms", type=float, default=10.0, help="time between tokens")
    sim.add_argument("--prefill-ms-per-token", type=float, default=0.0, help="added to the TTFT per prompt token")
    sim.add_argument("--transfer-ms", type=float, default=0.0,
                     help="decode side of a disaggregated request: the KV transfer after the prefill")
    sim.add_argument("--max-concurrency", type=int, default=0,
                     help="requests in flight before RESOURCE_EXHAUSTED (0 = unlimited)")
    sim.add_argument("--vocab-size", type=int, default=32000)
    sim.add_argument("--eos-token-id", type=int, default=None, help="stop on this token unless ignore_eos (default: never)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _make_model(args: argparse.Namespace) -> int:
    from cluster.model.presets import make_model

    make_model(args.preset, args.out_dir, seed=args.seed)
    print(f"wrote {args.preset} checkpoint to {args.out_dir}")
    return 0


def _build_llm(args: argparse.Namespace):
    from cluster import LLM

    return LLM(
        str(args.model),
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_gib=args.kv_cache_memory_gib,
        attention_backend=args.attention_backend,
    )


def _sampling(args: argparse.Namespace):
    from cluster import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _generate(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args.input) if args.input else list(_DEMO_PROMPTS)
    llm = _build_llm(args)
    start = time.perf_counter()
    outputs = llm.generate(prompts, _sampling(args), use_tqdm=True)
    elapsed = time.perf_counter() - start
    num_tokens = sum(len(o.token_ids) for o in outputs)
    lines = [
        json.dumps({"prompt": p if isinstance(p, str) else None, "text": o.text, "token_ids": o.token_ids,
                    "finish_reason": o.finish_reason.value if o.finish_reason else None}, ensure_ascii=False)
        for p, o in zip(prompts, outputs, strict=True)
    ]
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")
    else:
        print("\n".join(lines))
    print(f"{len(outputs)} prompts, {num_tokens} tokens in {elapsed:.2f}s ({num_tokens / elapsed:.1f} tok/s)",
          file=sys.stderr)
    return 0


def _up(args: argparse.Namespace) -> int:
    from cluster.config import ClusterConfig
    from cluster.up import run_up, with_cli_overrides

    try:
        config = ClusterConfig.from_yaml(args.config) if args.config else ClusterConfig()
        engine = {"dtype": args.dtype, "max_num_seqs": args.max_num_seqs, "kv_cache_memory_gib": args.kv_cache_memory_gib,
                  "max_num_batched_tokens": args.max_num_batched_tokens, "attention_backend": args.attention_backend}
        if args.config is None:
            engine.setdefault("num_threads", 1)  # workers share this machine's cores
        config = with_cli_overrides(config, model=args.model, unified=args.unified, host=args.host, port=args.port,
                                    grpc_port=args.grpc_port, engine=engine)
    except (OSError, ValueError) as exc:
        print(f"pdserve up: {exc}", file=sys.stderr)
        return 2
    return run_up(config, args.once)

def _simulated_worker(args: argparse.Namespace) -> int:
    """No model, no torch: the simulated servicer on asyncio, until SIGTERM or Ctrl-C."""
    import asyncio
    import logging
    import signal

    from cluster.worker.simulated import SimConfig, run_loop, serve_simulated

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = SimConfig(
        ttft_s=args.ttft_ms / 1e3, itl_s=args.itl_ms / 1e3, prefill_s_per_token=args.prefill_ms_per_token / 1e3,
        transfer_s=args.transfer_ms / 1e3, max_concurrency=args.max_concurrency, vocab_size=args.vocab_size,
        eos_token_id=args.eos_token_id,
        model=args.served_model_name or (args.model.name if args.model else "simulated"),
    )

    async def main() -> None:
        ports: list[int] = []
        ready = asyncio.Event()
        task = asyncio.create_task(serve_simulated(config, args.host, args.port, ready, ports,
                                                   **_registry_kwargs(args)))
        # SIGTERM shuts down cleanly: the worker leaves the registry instead of lingering a TTL.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await ready.wait()
        print(f"READY {args.host}:{ports[0]}", flush=True)
        await task

    try:
        run_loop(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0


def _worker(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from cluster.config import EngineConfig
    from cluster.parallel.launch import launch_tp_engine
    from cluster.worker.engine_loop import EngineLoop
    from cluster.worker.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = EngineConfig(
        dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_gib=args.kv_cache_memory_gib, num_kv_blocks=args.num_kv_blocks,
        attention_backend=args.attention_backend, num_threads=args.threads, tensor_parallel_size=args.tp,
        enable_prefix_caching=args.enable_prefix_caching,
    )
    # With --tp N this process is rank 0; ranks > 0 of a worker that receives KV get their own KV endpoint.
    receives_kv = args.tp > 1 and args.role != "prefill"
    launched = []

    def make_engine():  # on the engine's own thread: see cluster/worker/engine_loop.py
        engine, replica = launch_tp_engine(args.model, config, kv_host=args.host,
                                           kv_transport=args.kv_transport if receives_kv else None)
        launched.append(replica)
        return engine

    loop = EngineLoop.build(make_engine, name=f"{args.role}-engine")
    replica = launched[0]

    async def main() -> None:
        ports: list[int] = []
        ready = asyncio.Event()
        task = asyncio.create_task(serve(loop, args.role, args.model.name, args.host, args.port,
                                         args.kv_transport, ready, ports, tuple(replica.kv_addresses), args.prefill_tp,
                                         model_name=args.served_model_name, **_registry_kwargs(args)))
        # SIGTERM leaves the registry, stops the server and the engine thread, then the TP ranks (finally, below)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await ready.wait()
        print(f"READY {args.host}:{ports[0]}", flush=True)
        await task

    try:
        asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        replica.shutdown()
    return 0


def _registry_kwargs(args: argparse.Namespace) -> dict:
    kwargs: dict = {"redis_url": args.redis_url}
    if args.registry_ttl is not None:
        kwargs["registry_ttl_s"] = args.registry_ttl
    return kwargs


def _status(args: argparse.Namespace) -> int:
    from cluster.status import run_status

    return run_status(args.redis_url, as_json=args.json)


def _read_prompts(path: Path) -> list:
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "prompt" in record:
            prompts.append(record["prompt"])
        elif "prompt_token_ids" in record:
            prompts.append(record["prompt_token_ids"])
        else:
            raise ValueError(f"{path}:{number}: each line needs a 'prompt' or 'prompt_token_ids' field")
    return prompts


if __name__ == "__main__":
    sys.exit(main())
