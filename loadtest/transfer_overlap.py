"""How much of a prompt's KV transfer hides behind the prefill's own compute.

    python -m loadtest.transfer_overlap [--model models/small --prompt-len 2048] [--write BENCHMARKS.md]

The prefill engine sends each layer's pages the moment the layer is written, so layer i travels while
layers i+1.. compute. Three timings per repetition, on one compute thread (the transfer's thread gets
the other core): A = prefill of the prompt alone; C = the same pages sent alone (gathered from the
cache, checksummed, written into shuffled destination blocks: the `local` transport end to end);
B = prefill with the transfer attached, from the start of the step to the receiver's DONE.
Hidden fraction = (A + C - B) / C: 1 means the transfer cost nothing beyond the compute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import time
from pathlib import Path

import torch

from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.request import SamplingParams
from cluster.transfer import KVPoll, TransferSpec, create_receiver, create_sender
from loadtest.report import write_section

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def wait_done(receiver, timeout: float = 60.0) -> float:
    deadline = time.perf_counter() + timeout
    while (state := receiver.poll()) not in (KVPoll.DONE, KVPoll.FAILED):
        if time.perf_counter() > deadline:
            raise TimeoutError("transfer did not finish")
        time.sleep(0.0002)
    if state != KVPoll.DONE:
        raise RuntimeError(f"transfer failed: {receiver.error}")
    return time.perf_counter()


def run_prefill(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def measure(args) -> dict:
    torch.set_num_threads(1)
    config = EngineConfig(dtype="float32", num_kv_blocks=4 * args.prompt_len // 16 + 8, num_threads=1,
                          max_num_batched_tokens=args.prompt_len, enable_prefix_caching=False)
    engine = LLMEngine(str(args.model), config)
    arch, bs = engine.arch, config.block_size
    num_blocks = -(-args.prompt_len // bs)
    dest_k = [torch.zeros(num_blocks * 2, bs, arch.num_kv_heads, arch.head_dim) for _ in range(arch.num_layers)]
    dest_v = [torch.zeros_like(t) for t in dest_k]
    rng = random.Random(0)
    a_times, b_times, c_times = [], [], []
    for rep in range(args.repeats + 1):  # the first round warms up allocators and threads
        prompt = [rng.randrange(16, arch.vocab_size) for _ in range(args.prompt_len)]
        dest_blocks = rng.sample(range(num_blocks * 2), num_blocks)

        def spec(tid: str) -> TransferSpec:
            return TransferSpec(tid, arch.num_layers, bs, arch.num_kv_heads, arch.head_dim, "float32", num_blocks)

        # A: compute only
        engine.add_request(f"a{rep}", prompt, ONE_TOKEN)
        t0 = time.perf_counter()
        run_prefill(engine)
        a = time.perf_counter() - t0
        # B: compute with the transfer attached
        receiver = create_receiver("local", spec(f"b{rep}"), dest_k, dest_v, dest_blocks)
        engine.add_request(f"b{rep}", prompt, ONE_TOKEN, kv_sender=create_sender("local", spec(f"b{rep}")))
        t0 = time.perf_counter()
        run_prefill(engine)
        b = wait_done(receiver) - t0
        receiver.close()
        # C: as many pages moved alone, read from the prefill cache (contents don't change the cost)
        block_ids = torch.arange(num_blocks)
        receiver = create_receiver("local", spec(f"c{rep}"), dest_k, dest_v, dest_blocks)
        sender = create_sender("local", spec(f"c{rep}"))
        t0 = time.perf_counter()
        for layer in range(arch.num_layers):
            sender.send_layer_blocks(layer, engine.attn.k_caches[layer], engine.attn.v_caches[layer], block_ids)
        sender.finish(0)
        c = wait_done(receiver) - t0
        receiver.close()
        if rep:
            a_times.append(a)
            b_times.append(b)
            c_times.append(c)
    a, b, c = (statistics.median(x) for x in (a_times, b_times, c_times))
    return {"prefill_s": a, "prefill_with_transfer_s": b, "transfer_alone_s": c,
            "hidden_fraction": max(0.0, min(1.0, (a + c - b) / c)), "bytes": 2 * 4 * arch.num_layers * num_blocks
            * bs * arch.num_kv_heads * arch.head_dim}


def render(r: dict, args) -> str:
    return "\n".join([
        f"Date: {datetime.date.today()} · model: {args.model}, one {args.prompt_len}-token prompt, fp32, "
        f"{r['bytes'] / 2**20:.0f} MiB of KV · local transport · median of {args.repeats} · command: "
        f"`python -m loadtest.transfer_overlap --prompt-len {args.prompt_len}`",
        "",
        "| prefill alone | transfer alone | prefill + transfer (start to receiver DONE) | transfer hidden |",
        "|---:|---:|---:|---:|",
        f"| {r['prefill_s'] * 1e3:.0f} ms | {r['transfer_alone_s'] * 1e3:.0f} ms | "
        f"{r['prefill_with_transfer_s'] * 1e3:.0f} ms | {r['hidden_fraction']:.0%} |",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/small"))
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not (args.model / "config.json").exists():
        from cluster.model.presets import make_model

        make_model("small", args.model)
    result = measure(args)
    body = render(result, args)
    print(body)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.write:
        write_section(args.write, "transfer-overlap", "KV transfer hidden behind prefill compute", body)


if __name__ == "__main__":
    main()
