"""Offline throughput: pdserve's engine vs transformers' generate() on the same prompts, same run.

    python -m loadtest.offline_bench [--num-prompts 200 --input-len 256 --output-len 128] [--write BENCHMARKS.md]

Both sides get the same random token-id prompts, greedy decoding, ignore_eos (every request emits
exactly output_len tokens), the same dtype and thread count. transformers runs static batches of
`--hf-batch-size`. With --write, the table replaces the "offline" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from loadtest.report import write_section


def make_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the first ids: presets reserve them for special tokens.
    return [[rng.randrange(16, vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


def run_engine(model_dir: Path, prompts: list[list[int]], output_len: int, dtype: str, profile: bool,
               device: str) -> dict:
    from cluster import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype=dtype, device=device)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up (kernel build, allocator)
    start = time.perf_counter()
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            outputs = llm.generate(prompts, params, use_tqdm=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    else:
        outputs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    num_tokens = sum(len(o.token_ids) for o in outputs)
    assert num_tokens == len(prompts) * output_len, "ignore_eos run emitted the wrong number of tokens"
    return {"seconds": elapsed, "output_tokens": num_tokens, "output_tok_s": num_tokens / elapsed}


def run_transformers(model_dir: Path, prompts: list[list[int]], output_len: int, dtype: str, batch: int,
                     device: str) -> dict:
    from transformers import AutoModelForCausalLM

    torch_dtype = torch.float32 if dtype in ("auto", "float32") else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    num_tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in tqdm(range(0, len(prompts), batch), desc="transformers", unit="batch"):
            ids = torch.tensor(prompts[i : i + batch], device=device)
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len,
                do_sample=False, pad_token_id=0,
            )
            num_tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "output_tokens": num_tokens, "output_tok_s": num_tokens / elapsed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/small"))
    parser.add_argument("--preset", default="small", help="made into --model if it does not exist")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N], for both systems")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per system; the median run is reported")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the torch profiler's top ops for the engine")
    parser.add_argument("--write", type=Path, help="rewrite this markdown file's offline section")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.model / "config.json").exists():
        from cluster.model.presets import make_model

        make_model(args.preset, args.model)
    vocab_size = json.loads((args.model / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args.num_prompts, args.input_len, vocab_size, args.seed)

    # Runs alternate between the systems so slow drift on a shared machine hits both alike.
    runs: dict[str, list[dict]] = {"engine": [], "transformers": []}
    for i in range(args.repeat):
        print(f"run {i + 1}/{args.repeat}")
        runs["engine"].append(run_engine(args.model, prompts, args.output_len, args.dtype, args.profile,
                                          args.device))
        if not args.skip_transformers:
            runs["transformers"].append(
                run_transformers(args.model, prompts, args.output_len, args.dtype, args.hf_batch_size, args.device)
            )
    results = {name: median_run(r) for name, r in runs.items() if r}
    table = render(results, args)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.write:
        on_gpu = args.device != "cpu"
        write_section(args.write, "offline-bench-gpu" if on_gpu else "offline-bench",
                      f"Offline throughput (engine vs transformers){' on GPU' if on_gpu else ''}", table)


def median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["output_tok_s"])
    median = dict(ordered[len(ordered) // 2])
    median["all_output_tok_s"] = [round(r["output_tok_s"], 1) for r in runs]
    return median


def machine(device: str) -> str:
    if device == "cpu":
        return f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"


def render(results: dict, args: argparse.Namespace) -> str:
    command = (f"python -m loadtest.offline_bench --num-prompts {args.num_prompts} --input-len {args.input_len} "
               f"--output-len {args.output_len} --dtype {args.dtype} --repeat {args.repeat}"
               + (f" --device {args.device}" if args.device != "cpu" else ""))
    lines = [
        f"Date: {datetime.date.today()} · machine: {machine(args.device)} "
        f"· model: {args.model} ({args.dtype}) · command: `{command}`",
        "",
        f"Median of {args.repeat} run(s) per system, alternating.",
        "",
        "| system | output tokens | seconds | output tok/s | ratio | every run (tok/s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    baseline = results.get("transformers", {}).get("output_tok_s")
    for name, r in results.items():
        ratio = f"{r['output_tok_s'] / baseline:.2f}x" if baseline else "-"
        label = "pdserve engine" if name == "engine" else f"transformers generate (batch {args.hf_batch_size})"
        every = ", ".join(f"{x:.0f}" for x in r["all_output_tok_s"])
        lines.append(
            f"| {label} | {r['output_tokens']} | {r['seconds']:.1f} | {r['output_tok_s']:.0f} | {ratio} | {every} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
