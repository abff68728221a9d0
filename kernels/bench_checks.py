"""Correctness checks the benchmark runs before timing anything (imports the Triton kernels).

Each check compares a kernel with its torch reference at the same dtype and with a float64
computation, on poisoned outputs and NaN-poisoned unowned cache slots, and raises on a mismatch.
On CPU (interpreter) the bench runs them at the small shapes below; on a GPU it runs them at the
shapes it is about to time too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import reference
from kernels.paged_cases import PagedCase, make_paged_case
from kernels.triton_cache import write_kv_cache
from kernels.triton_decode import paged_decode_attention
from kernels.triton_pages import pack_pages, pack_pages_int8, unpack_pages, unpack_pages_int8
from kernels.triton_prefill import prefill_attention

TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass
class CheckResult:
    name: str
    err_vs_reference: float  # max |kernel - torch reference| (same dtype)
    err_vs_float64: float  # max |kernel - float64 computation|

    def __str__(self) -> str:
        return f"ok  {self.name:<48} max err vs torch {self.err_vs_reference:.2e}, vs float64 {self.err_vs_float64:.2e}"


def _compare(name: str, out: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> CheckResult:
    tol = TOLERANCE[out.dtype]
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: non-finite output (unwritten element or read past a context)")
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol, msg=lambda m: f"{name} vs torch: {m}")
    torch.testing.assert_close(out.double(), exact, atol=tol, rtol=tol, msg=lambda m: f"{name} vs float64: {m}")
    return CheckResult(name, (out.float() - ref.float()).abs().max().item(), (out.double() - exact).abs().max().item())


def check_decode(case: PagedCase, num_heads: int, num_splits: int | None, label: str) -> CheckResult:
    q = torch.randn(case.seq_lens.shape[0], num_heads, case.k_cache.shape[3], device=case.k_cache.device)
    q = q.to(case.k_cache.dtype)
    scale = q.shape[2] ** -0.5
    args = (case.k_cache, case.v_cache, case.block_tables, case.seq_lens, scale)
    out = paged_decode_attention(q, *args, num_splits=num_splits, out=torch.full_like(q, float("nan")))
    ref = reference.paged_decode_attention(q, *args)
    exact = reference.paged_decode_attention(q.double(), case.k_cache.double(), case.v_cache.double(), *args[2:])
    return _compare(f"decode {label}", out, ref, exact)


def check_prefill(case: PagedCase, query_lens: list[int], num_heads: int, label: str) -> CheckResult:
    device = case.k_cache.device
    q = torch.randn(sum(query_lens), num_heads, case.k_cache.shape[3], device=device).to(case.k_cache.dtype)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], device=device)
    scale = q.shape[2] ** -0.5
    tail = (case.block_tables, case.seq_lens, starts, scale)
    out = prefill_attention(q, case.k_cache, case.v_cache, *tail, out=torch.full_like(q, float("nan")))
    ref = reference.prefill_attention(q, case.k_cache, case.v_cache, *tail)
    exact = reference.prefill_attention(q.double(), case.k_cache.double(), case.v_cache.double(), *tail)
    return _compare(f"prefill {label}", out, ref, exact)


def check_cache_write(num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      device: torch.device) -> CheckResult:
    block_size, num_blocks = 16, num_tokens // 8 + 4
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, device=device).to(dtype) for _ in range(2))
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(4)]
    write_kv_cache(k, v, caches[0], caches[1], slots)
    reference.write_kv_cache(k, v, caches[2], caches[3], slots)
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"cache write: {m}")
    return CheckResult(f"cache write T={num_tokens}", 0.0, 0.0)


def check_pages(num_layers: int, num_blocks: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device, block_size: int = 16) -> list[CheckResult]:
    shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
    k_src = [torch.randn(shape, device=device).to(dtype) for _ in range(num_layers)]
    v_src = [torch.randn(shape, device=device).to(dtype) for _ in range(num_layers)]
    src, dst = (torch.randperm(num_blocks + 1, device=device)[:num_blocks] for _ in range(2))
    layers, heads = range(num_layers), range(num_kv_heads // 2, num_kv_heads)  # a TP rank's head slice
    ref = reference.pack_pages(k_src, v_src, layers, src, heads)
    buffer = pack_pages(k_src, v_src, layers, src, heads, out=torch.full_like(ref, float("nan")))
    if not torch.equal(buffer, ref):
        raise AssertionError("pack_pages differs from the reference")
    k_dst = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(num_layers)]
    v_dst = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(num_layers)]
    unpack_pages(buffer, k_dst, v_dst, layers, dst, heads)
    if not torch.equal(reference.pack_pages(k_dst, v_dst, layers, dst, heads), ref):
        raise AssertionError("unpack_pages did not restore the packed pages")
    results = [CheckResult(f"pack/unpack L={num_layers} nb={num_blocks}", 0.0, 0.0)]

    packed = pack_pages_int8(k_src, v_src, layers, src, heads)
    ref8 = reference.pack_pages_int8(k_src, v_src, layers, src, heads)
    if (packed.data.int() - ref8.data.int()).abs().max() > 1 or not torch.equal(packed.scales, ref8.scales):
        raise AssertionError("pack_pages_int8 differs from the reference")
    unpack_pages_int8(packed, k_dst, v_dst, layers, dst, heads)
    restored = reference.pack_pages(k_dst, v_dst, layers, dst, heads).double()
    err = (restored - ref.double()).abs()
    # Half a quantisation step, plus rounding the dequantised value to the cache dtype.
    bound = packed.scales.double()[:, :, :, None, :, None] / 2 + ref.double().abs() * torch.finfo(dtype).eps / 2
    if not (err <= bound * (1 + 1e-6)).all():
        raise AssertionError("int8 round trip beyond half a quantisation step")
    rel = (err.max() / ref.double().abs().max()).item()
    results.append(CheckResult(f"int8 round trip L={num_layers} nb={num_blocks} (rel {rel:.1e})",
                               (packed.data.int() - ref8.data.int()).abs().max().item(), err.max().item()))
    return results


def run_small_checks(dtype: torch.dtype, device: torch.device) -> list[CheckResult]:
    """Shapes small enough for the interpreter: every kernel and every code path once."""
    results = []
    for group, splits in ((1, 1), (4, 1), (8, 3)):
        case = make_paged_case([1, 37, 90], 2, 64, 16, dtype, device)
        results.append(check_decode(case, 2 * group, splits, f"GQA {group} splits {splits}"))
    query_lens = [1, 21, 9, 6]  # one-token prompt, fresh prompt, cached prefix, later chunk
    case = make_paged_case([1, 21, 40, 27], 2, 64, 16, dtype, device)
    results.append(check_prefill(case, query_lens, 4, "mixed fresh/prefix/chunk GQA 2"))
    results.append(check_cache_write(9, 2, 64, dtype, device))
    results.extend(check_pages(2, 3, 4, 32, dtype, device))
    return results
