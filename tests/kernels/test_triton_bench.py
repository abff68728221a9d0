"""The kernel benchmark cannot rot on CPU-only CI: its CPU path runs end to end, and its GPU timing
code runs at tiny shapes in the interpreter with a fake timer. Also: the engine never imports Triton."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _env_without_interpreter() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine
    return env


def test_bench_cpu_path_checks_correctness_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "kernels.bench"], cwd=ROOT, env=_env_without_interpreter(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Triton interpreter on CPU" in proc.stdout
    assert proc.stdout.count("ok  decode") == 6 and proc.stdout.count("ok  int8 round trip") == 2
    assert "timing needs a GPU" in proc.stdout


def test_engine_imports_no_triton():
    """Triton is imported only when the triton backend is built (after TRITON_INTERPRET is settled)."""
    code = ("import sys, cluster.engine.engine, cluster.attention.selector, kernels.reference; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env_without_interpreter(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_timing_code_runs_at_tiny_shapes(monkeypatch, capsys):
    from kernels import bench_timing as bt

    monkeypatch.setattr(bt, "median_ms", lambda fn: (fn(), 1.0)[1])  # run once, pretend 1 ms
    monkeypatch.setattr(bt, "_free", lambda: None)  # torch.cuda.* needs a GPU
    roof = bt.Roofline(copy_gbps=100.0, matmul_tflops=10.0)
    cpu, dtype = torch.device("cpu"), torch.float32
    bt.bench_decode([1, 40], 4, 2, 32, dtype, cpu, roof)
    bt.bench_prefill([5, 20], 0, 4, 2, 32, dtype, cpu, roof)
    bt.bench_prefill([6, 6], 10, 4, 2, 32, dtype, cpu, roof)
    bt.bench_cache_write(9, 2, 32, dtype, cpu, roof)
    bt.bench_pages(2, 3, 2, 32, dtype, cpu, roof)
    out = capsys.readouterr().out
    for row in ("decode B=2", "torch SDPA, padded", "prefill B=2", "torch SDPA causal", "cache write T=9",
                "pack L=2", "unpack int8 L=2"):
        assert row in out, out


@pytest.mark.parametrize("name", ["reference", "paged_cases"])
def test_torch_side_modules_do_not_need_triton(name):
    source = (ROOT / "kernels" / f"{name}.py").read_text()
    assert "import triton" not in source
