"""Launch-shape sweep: `python -m kernels.sweep` times each kernel's tile options on this GPU.

For the prefill attention kernel (PrefillTiles) and the page pack/unpack copy (CopyTile) it runs
every candidate on the serving shapes of kernels/bench_timing.py, checks its output against the
default shape's (same math, so only summation order may differ), and prints the median time of each
with the fastest marked, so the defaults in kernels/triton_*.py can be chosen from numbers measured
on the device they will run on. `--smoke` runs tiny shapes through the Triton interpreter on CPU, so
the sweep itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial

import torch


def _median_ms(fn: Callable[[], object], smoke: bool) -> float:
    if smoke:  # the interpreter: one call, wall clock; only proves the path runs
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _report(title: str, rows: list[tuple[str, float]]) -> None:
    best = min(ms for _, ms in rows)
    print(f"\n{title}")
    for name, ms in rows:
        print(f"  {name:<36} {ms:9.3f} ms  {best / ms:6.1%} of best{'  <- fastest' if ms == best else ''}")


def sweep_prefill(dtype: torch.dtype, device: torch.device, smoke: bool) -> None:
    from kernels.paged_cases import make_paged_case
    from kernels.triton_prefill import PrefillTiles, default_prefill_tiles, prefill_attention

    head_dim, num_heads, num_kv_heads = (32, 4, 2) if smoke else (128, 32, 8)
    cases = (
        [([24, 9], 0)]
        if smoke
        else [([2048] * 8, 0), ([1024] * 8, 1024), ([64 + 127 * i for i in range(16)], 0)]
    )
    candidates = (
        [PrefillTiles(16, 16, 4, 1), PrefillTiles(16, 32, 4, 1)]
        if smoke
        else [
            PrefillTiles(m, n, w, s)
            for m, n, w, s in (
                (128, 64, 8, 2),
                (128, 64, 8, 3),
                (128, 64, 4, 3),
                (128, 128, 8, 2),
                (128, 128, 8, 3),
                (64, 64, 4, 3),
                (64, 128, 4, 3),
                (128, 32, 4, 3),
                (64, 32, 4, 4),
            )
        ]
    )
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for query_lens, cached in cases:
        case = make_paged_case(
            [cached + n for n in query_lens], num_kv_heads, head_dim, 16, dtype, device, poison=False
        )
        q = torch.randn(sum(query_lens), num_heads, head_dim, device=device).to(dtype)
        starts = torch.tensor(
            [0, *torch.tensor(query_lens).cumsum(0).tolist()], device=device, dtype=torch.int32
        )
        args = (q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, starts, head_dim**-0.5)
        want = prefill_attention(*args, max_query_len=max(query_lens), tiles=default_prefill_tiles(head_dim))
        rows = []
        for tiles in candidates:
            got = prefill_attention(*args, max_query_len=max(query_lens), tiles=tiles)
            torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m, t=tiles: f"{t}: {m}")
            ms = _median_ms(
                partial(prefill_attention, *args, max_query_len=max(query_lens), tiles=tiles), smoke
            )
            rows.append((f"m{tiles.block_m} n{tiles.block_n} w{tiles.num_warps} s{tiles.num_stages}", ms))
        _report(
            f"prefill B={len(query_lens)} new<={max(query_lens)} cached={cached} Hq={num_heads} "
            f"Hkv={num_kv_heads} D={head_dim}",
            rows,
        )


def sweep_pages(dtype: torch.dtype, device: torch.device, smoke: bool) -> None:
    from kernels import reference
    from kernels.triton_pages import CopyTile, pack_pages, unpack_pages

    num_kv_heads, head_dim, num_blocks = (4, 32, 5) if smoke else (8, 128, 256)
    candidates = (
        [CopyTile(64, 1), CopyTile(256, 2)]
        if smoke
        else [CopyTile(e, w) for e in (1024, 2048, 4096, 8192, 16384) for w in (4, 8)]
    )
    for num_layers, heads in (
        (1, range(num_kv_heads)),
        (1, range(num_kv_heads // 2)),
        (4 if smoke else 32, None),
    ):
        shape = (num_layers, 2 * num_blocks, 16, num_kv_heads, head_dim)  # one allocation, as PagedKVCache
        k_caches, v_caches = (list(torch.randn(shape, device=device).to(dtype).unbind(0)) for _ in range(2))
        blocks = torch.randperm(2 * num_blocks, device=device)[:num_blocks]
        layers = range(num_layers)
        want = reference.pack_pages(k_caches, v_caches, layers, blocks, heads)
        buffer = torch.empty_like(want)
        rows = []
        for tile in candidates:
            pack_pages(k_caches, v_caches, layers, blocks, heads, out=buffer, tile=tile)
            if not torch.equal(buffer, want):
                raise AssertionError(f"pack_pages with {tile} differs from the reference")
            ms_pack = _median_ms(
                partial(pack_pages, k_caches, v_caches, layers, blocks, heads, out=buffer, tile=tile), smoke
            )
            ms_unpack = _median_ms(
                partial(unpack_pages, buffer, k_caches, v_caches, layers, blocks, heads, tile=tile), smoke
            )
            gbps = 2 * buffer.numel() * buffer.element_size() / ms_pack / 1e6
            rows.append(
                (f"elems {tile.elems:>5} warps {tile.num_warps} (pack {gbps:5.0f} GB/s)", ms_pack + ms_unpack)
            )
        heads_label = (
            "all heads"
            if heads is None or len(heads) == num_kv_heads
            else f"heads {heads.start}-{heads.stop - 1}"
        )
        _report(f"pack + unpack L={num_layers} nb={num_blocks} Hkv={num_kv_heads} {heads_label}", rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in the Triton interpreter on CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("kernels.sweep times kernels on a GPU; none here (use --smoke to run the path on CPU)")
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else getattr(torch, args.dtype)
    if not args.smoke:
        print(f"{torch.cuda.get_device_name(device)}, {dtype}")
    sweep_prefill(dtype, device, args.smoke)
    sweep_pages(dtype, device, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
