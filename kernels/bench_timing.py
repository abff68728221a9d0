"""GPU timings for the Triton kernels, against the device's own roofline measured in the same run.

Every number is a median from triton.testing.do_bench. Decode attention and page packing are
memory-bound: they report achieved GB/s (unique bytes read + written) next to the device's measured
copy bandwidth. Prefill attention is compute-bound: it reports TFLOP/s (4 * D * Hq per visible
query-key pair) next to the measured dense matmul rate. Attention rows also time torch's
scaled_dot_product_attention on padded dense tensors of the same problem, the baseline a paged
kernel has to beat while reading from scattered blocks.

Each case checks its kernel against the torch reference at the timed shape before timing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kernels import bench_checks
from kernels.paged_cases import make_paged_case
from kernels.triton_cache import write_kv_cache
from kernels.triton_decode import choose_num_splits, paged_decode_attention
from kernels.triton_pages import pack_pages, pack_pages_int8, unpack_pages, unpack_pages_int8
from kernels.triton_prefill import prefill_attention


def median_ms(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


@dataclass
class Roofline:
    copy_gbps: float  # device-to-device copy, bytes read + written
    matmul_tflops: float  # dense square matmul in the benchmark dtype


def measure_roofline(dtype: torch.dtype, device: torch.device) -> Roofline:
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    n = 8192
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    mm_ms = median_ms(lambda: a @ b)
    return Roofline(2 * src.numel() / copy_ms / 1e6, 2 * n**3 / mm_ms / 1e9)


def _row(name: str, ms: float, rate: str, baseline: str = "") -> None:
    print(f"  {name:<44} {ms:9.3f} ms  {rate:<28} {baseline}")


def _free() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def bench_decode(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, roof: Roofline, block_size: int = 16) -> None:
    batch, max_len = len(seq_lens), max(seq_lens)
    ctx = str(max_len) if min(seq_lens) == max_len else f"<={max_len}"
    label = f"B={batch} ctx={ctx} Hq={num_heads} Hkv={num_kv_heads}"
    elt = torch.empty((), dtype=dtype).element_size()
    nbytes = 2 * sum(seq_lens) * num_kv_heads * head_dim * elt + 2 * batch * num_heads * head_dim * elt
    auto = choose_num_splits(batch, num_kv_heads, max_len, device)
    for splits in sorted({1, auto}):
        ms = _time_paged_decode(seq_lens, num_heads, num_kv_heads, head_dim, dtype, device, block_size, splits, label)
        _free()  # the helpers' tensors died on return: hand their memory back before the next case
        gbps = nbytes / ms / 1e6
        _row(f"decode {label} splits={splits}", ms, f"{gbps:7.0f} GB/s ({gbps / roof.copy_gbps:4.0%} of copy)")
    ms = _time_sdpa_decode(seq_lens, num_heads, num_kv_heads, head_dim, dtype, device)
    _free()
    _row("  torch SDPA, padded dense K/V", ms, f"{nbytes / ms / 1e6:7.0f} GB/s (same useful bytes)")


def _time_paged_decode(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                       device: torch.device, block_size: int, num_splits: int, label: str) -> float:
    case = make_paged_case(seq_lens, num_kv_heads, head_dim, block_size, dtype, device, poison=False)
    print(bench_checks.check_decode(case, num_heads, num_splits, f"{label} splits={num_splits}"))
    q = torch.randn(len(seq_lens), num_heads, head_dim, device=device).to(dtype)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, head_dim**-0.5)
    return median_ms(lambda: paged_decode_attention(*args, num_splits=num_splits, max_seq_len=max(seq_lens)))


def _time_sdpa_decode(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      device: torch.device) -> float:
    """SDPA over dense [B, Hkv, max_len, D] K/V; a ragged batch needs a padding mask."""
    batch, max_len = len(seq_lens), max(seq_lens)
    q = torch.randn(batch, num_heads, 1, head_dim, device=device).to(dtype)
    k, v = (torch.randn(batch, num_kv_heads, max_len, head_dim, device=device).to(dtype) for _ in range(2))
    mask = None
    if min(seq_lens) != max_len:
        lens = torch.tensor(seq_lens, device=device)
        mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
    return median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))


def bench_prefill(query_lens: list[int], cached: int, num_heads: int, num_kv_heads: int, head_dim: int,
                  dtype: torch.dtype, device: torch.device, roof: Roofline, block_size: int = 16) -> None:
    label = f"B={len(query_lens)} new<={max(query_lens)} cached={cached} Hq={num_heads} Hkv={num_kv_heads}"
    pairs = sum(n * cached + n * (n + 1) // 2 for n in query_lens)  # visible (query, key) pairs
    flops = 4 * head_dim * num_heads * pairs
    ms = _time_paged_prefill(query_lens, cached, num_heads, num_kv_heads, head_dim, dtype, device, block_size, label)
    _free()
    tflops = flops / ms / 1e9
    _row(f"prefill {label}", ms, f"{tflops:6.1f} TFLOP/s ({tflops / roof.matmul_tflops:4.0%} of matmul)")
    if cached == 0:  # SDPA's causal mask has no notion of a cached prefix
        ms = _time_sdpa_prefill(query_lens, num_heads, num_kv_heads, head_dim, dtype, device)
        _free()
        padded = "" if min(query_lens) == max(query_lens) else ", padded to the longest"
        _row(f"  torch SDPA causal, dense{padded}", ms, f"{flops / ms / 1e9:6.1f} TFLOP/s (same useful FLOPs)")


def _time_paged_prefill(query_lens: list[int], cached: int, num_heads: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype, device: torch.device, block_size: int, label: str) -> float:
    case = make_paged_case([cached + n for n in query_lens], num_kv_heads, head_dim, block_size, dtype, device,
                           poison=False)
    print(bench_checks.check_prefill(case, query_lens, num_heads, label))
    q = torch.randn(sum(query_lens), num_heads, head_dim, device=device).to(dtype)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], device=device, dtype=torch.int32)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, starts, head_dim**-0.5)
    return median_ms(lambda: prefill_attention(*args, max_query_len=max(query_lens)))


def _time_sdpa_prefill(query_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                       device: torch.device) -> float:
    """Causal SDPA over dense [B, H, max_len, D]; a ragged batch pads to the longest (the causal mask
    keeps padded rows harmless, they only cost time)."""
    batch, n = len(query_lens), max(query_lens)
    q = torch.randn(batch, num_heads, n, head_dim, device=device).to(dtype)
    k, v = (torch.randn(batch, num_kv_heads, n, head_dim, device=device).to(dtype) for _ in range(2))
    return median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def bench_cache_write(num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      device: torch.device, roof: Roofline) -> None:
    print(bench_checks.check_cache_write(num_tokens, num_kv_heads, head_dim, dtype, device))
    block_size, num_blocks = 16, 4 * num_tokens // 16
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, device=device).to(dtype) for _ in range(2))
    k_cache, v_cache = (torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
                        for _ in range(2))
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    ms = median_ms(lambda: write_kv_cache(k, v, k_cache, v_cache, slots))
    gbps = 4 * k.numel() * k.element_size() / ms / 1e6  # K and V, read and written
    _row(f"cache write T={num_tokens} Hkv={num_kv_heads}", ms, f"{gbps:7.0f} GB/s ({gbps / roof.copy_gbps:4.0%} of copy)")


def bench_pages(num_layers: int, num_blocks: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device, roof: Roofline, block_size: int = 16) -> None:
    for result in bench_checks.check_pages(num_layers, num_blocks, num_kv_heads, head_dim, dtype, device):
        print(result)
    _free()
    shape = (num_layers, 2 * num_blocks, block_size, num_kv_heads, head_dim)  # one allocation, as PagedKVCache
    k_caches, v_caches = (list(torch.randn(shape, device=device).to(dtype).unbind(0)) for _ in range(2))
    blocks = torch.randperm(2 * num_blocks, device=device)[:num_blocks]
    layers = range(num_layers)
    label = f"L={num_layers} nb={num_blocks} Hkv={num_kv_heads}"
    buffer = pack_pages(k_caches, v_caches, layers, blocks)
    plain = buffer.numel() * buffer.element_size()
    for name, fn in (("pack", lambda: pack_pages(k_caches, v_caches, layers, blocks, out=buffer)),
                     ("unpack", lambda: unpack_pages(buffer, k_caches, v_caches, layers, blocks))):
        ms = median_ms(fn)
        gbps = 2 * plain / ms / 1e6
        _row(f"{name} {label}", ms, f"{gbps:7.0f} GB/s ({gbps / roof.copy_gbps:4.0%} of copy)")
    packed = pack_pages_int8(k_caches, v_caches, layers, blocks)
    moved = plain + packed.nbytes  # the cache side and the wire side
    for name, fn in (("pack int8", lambda: pack_pages_int8(k_caches, v_caches, layers, blocks, out=packed)),
                     ("unpack int8", lambda: unpack_pages_int8(packed, k_caches, v_caches, layers, blocks))):
        ms = median_ms(fn)
        gbps = moved / ms / 1e6
        _row(f"{name} {label}", ms, f"{gbps:7.0f} GB/s ({gbps / roof.copy_gbps:4.0%} of copy)",
             f"wire {packed.nbytes / plain:.0%} of plain")


def run(dtype: torch.dtype, device: torch.device) -> None:
    roof = measure_roofline(dtype, device)
    print(f"\n{torch.cuda.get_device_name(device)}, {dtype}: copy {roof.copy_gbps:.0f} GB/s, "
          f"matmul {roof.matmul_tflops:.0f} TFLOP/s (measured now)")
    print("\ndecode attention (head_dim 128, block 16)")
    for group in (8, 1):  # the target: batch 64, context 4k, GQA 8 and 1
        bench_decode([4096] * 64, 32, 32 // group, 128, dtype, device, roof)
    lens = torch.randint(512, 4097, (64,)).tolist()
    bench_decode(lens, 32, 4, 128, dtype, device, roof)  # ragged contexts
    bench_decode([32768] * 4, 32, 4, 128, dtype, device, roof)  # few long contexts: split-K's case
    print("\nprefill attention (head_dim 128, block 16)")
    bench_prefill([2048] * 8, 0, 32, 8, 128, dtype, device, roof)
    bench_prefill([1024] * 8, 1024, 32, 8, 128, dtype, device, roof)  # prefix hits / later chunks
    bench_prefill(torch.randint(64, 2049, (16,)).tolist(), 0, 32, 8, 128, dtype, device, roof)  # varlen
    print("\nKV cache write")
    bench_cache_write(8192, 8, 128, dtype, device, roof)
    _free()
    print("\npage pack / unpack (4096-token request)")
    bench_pages(32, 256, 8, 128, dtype, device, roof)  # all layers at once
    _free()
    bench_pages(1, 256, 8, 128, dtype, device, roof)  # layer by layer, as the transfer sends them
