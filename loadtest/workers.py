"""Start worker processes for benchmarks: `pdserve worker` pinned to cores with taskset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass
class WorkerProcess:
    role: str
    address: str
    proc: subprocess.Popen

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_worker(role: str, model_dir: str, *, cpus: str | None, threads: int, extra: list[str] = (),
                 timeout: float = 120.0) -> WorkerProcess:
    args = ["--role", role, "--model", str(model_dir), "--threads", str(threads), *extra]
    prefix = ["taskset", "-c", cpus] if cpus is not None and shutil.which("taskset") else []
    return start_cli_worker(args, timeout=timeout, prefix=prefix, env={"OMP_NUM_THREADS": str(threads)})


def start_cli_worker(args: list[str], *, timeout: float = 120.0, prefix: list[str] = (),
                     env: dict[str, str] | None = None) -> WorkerProcess:
    """Run `pdserve worker ARGS` and wait for its `READY host:port` line (what tests and benches share)."""
    cmd = [*prefix, sys.executable, "-m", "cluster.cli", "worker", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    role = args[args.index("--role") + 1] if "--role" in args else "worker"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY "):
            return WorkerProcess(role, line.split()[1], proc)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{role} worker did not start: {' '.join(cmd)}")
