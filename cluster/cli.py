"""`pdserve` command line: make-model, generate, up.

    pdserve make-model --preset tiny models/tiny
    pdserve generate --model models/tiny --input prompts.jsonl --output results.jsonl
    pdserve up            # embedded defaults: tiny model (made if missing), local Ray, prefill + decode workers
    pdserve worker --role decode --model models/tiny     # one worker as a plain process
    pdserve worker --role simulated --ttft-ms 50 --itl-ms 10   # no model: tokens on a timer
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

    up = commands.add_parser("up", help="bring pdserve up on embedded defaults")
    _add_engine_args(up, model_required=False)
    up.add_argument("--once", action="store_true", help="make one chat request through the router and exit")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000, help="the OpenAI HTTP API")
    up.add_argument("--grpc-port", type=int, default=50051, help="the gRPC API (serving.proto)")

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
    worker.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (ranks > 0 run as child processes)")
    worker.add_argument("--prefill-tp", type=int, default=1,
                        help="decode role: TP size of the prefill workers sending here, when a request doesn't say")
    _add_simulated_args(worker)

    args = parser.parse_args(argv)
    if args.command == "worker":
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
    from cluster.config import EngineConfig
    from cluster.up import run_up

    config = EngineConfig(dtype=args.dtype, max_num_seqs=args.max_num_seqs, kv_cache_memory_gib=args.kv_cache_memory_gib,
                          max_num_batched_tokens=args.max_num_batched_tokens, attention_backend=args.attention_backend,
                          num_threads=1)
    return run_up(args.model, args.host, args.port, config, args.once, args.grpc_port)


def _simulated_worker(args: argparse.Namespace) -> int:
    """No model, no torch: the simulated servicer on asyncio, until SIGTERM or Ctrl-C."""
    import asyncio
    import logging

    from cluster.worker.simulated import SimConfig, serve_simulated

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = SimConfig(
        ttft_s=args.ttft_ms / 1e3, itl_s=args.itl_ms / 1e3, prefill_s_per_token=args.prefill_ms_per_token / 1e3,
        transfer_s=args.transfer_ms / 1e3, max_concurrency=args.max_concurrency, vocab_size=args.vocab_size,
        eos_token_id=args.eos_token_id, model=args.model.name if args.model else "simulated",
    )

    async def main() -> None:
        ports: list[int] = []
        ready = asyncio.Event()
        task = asyncio.create_task(serve_simulated(config, args.host, args.port, ready, ports))
        await ready.wait()
        print(f"READY {args.host}:{ports[0]}", flush=True)
        await task

    try:
        asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0


def _worker(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from cluster.config import EngineConfig
    from cluster.parallel.launch import launch_tp_engine
    from cluster.worker.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = EngineConfig(
        dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_gib=args.kv_cache_memory_gib, num_kv_blocks=args.num_kv_blocks,
        attention_backend=args.attention_backend, num_threads=args.threads, tensor_parallel_size=args.tp,
    )
    # With --tp N this process is rank 0; ranks > 0 of a worker that receives KV get their own KV endpoint.
    receives_kv = args.tp > 1 and args.role != "prefill"
    engine, replica = launch_tp_engine(args.model, config, kv_transport=args.kv_transport if receives_kv else None,
                                       kv_host=args.host)

    async def main() -> None:
        ports: list[int] = []
        ready = asyncio.Event()
        task = asyncio.create_task(serve(engine, args.role, args.model.name, args.host, args.port,
                                         args.kv_transport, ready, ports, tuple(replica.kv_addresses), args.prefill_tp))
        if args.tp > 1:  # SIGTERM stops the server and the engine thread, then the TP ranks (finally, below)
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
