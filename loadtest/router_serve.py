"""The router as its own process for benchmarks: one uvicorn process over a ModelPool of given workers.

    python -m loadtest.router_serve --model DIR --prefill HOST:PORT --decode HOST:PORT [--port 0]
        [--loop uvloop|asyncio] [--http httptools|h11] [--no-tune-gc] [--profile FILE]

Prints `READY host:port` once it accepts connections, like `pdserve worker`, so `start_router` can
wait for it; serves until SIGTERM. Pinned by the caller (taskset) so it owns one core. By default on
uvloop with uvicorn's httptools protocol (C parser, one transport write per chunk) rather than
asyncio and pure-Python h11, and with the garbage collector kept off the request path (`tune_gc`);
the flags keep the slower settings measurable. `--profile` writes cProfile stats at exit (it slows
the router: for where the time goes, not for figures).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.router import runtime


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: every stream is a socket (two for the router)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from cluster.model.arch import ModelArchConfig
    from cluster.model.tokenizer import Tokenizer
    from cluster.router.dispatch import ModelPool
    from cluster.router.http import create_app

    raise_fd_limit()
    arch = ModelArchConfig.from_dir(args.model)
    pool = ModelPool(args.name, Tokenizer.from_dir(args.model), arch.max_position_embeddings,
                     prefill=args.prefill, decode=args.decode)
    # Bind ourselves so port 0 works and the port is known before READY; a deep backlog because the
    # benchmark opens its connections all at once. IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY
    # only on sockets whose proto says TCP, and without it Nagle holds each SSE chunk ~40 ms.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app({args.name: pool}), log_level="warning", backlog=4096,
                            timeout_keep_alive=30, http=args.http, access_log=False)
    server = uvicorn.Server(config)

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if args.tune_gc:
            runtime.tune_gc()
        print(f"READY {args.host}:{port}", flush=True)
        await task

    profiler = None
    if args.profile:
        import cProfile

        # uvicorn re-raises the SIGTERM it caught once it has shut down: exit through `finally` then.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(run())
        else:
            asyncio.run(run())
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin_threads(cpus: set[int]) -> None:
    """Move every thread of this process (gRPC's own included) to `cpus`; sched_setaffinity on the
    process id alone moves only the calling thread."""
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # a thread that just ended
            os.sched_setaffinity(int(task.name), cpus)


@dataclass
class RouterProcess:
    address: str
    proc: subprocess.Popen

    def cpu_seconds(self) -> float:
        """CPU the router has used so far: tells a saturated router apart from a slow client."""
        return process_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_router(model_dir: Path, name: str, prefill: str, decode: str, *, cpus: str | None,
                 loop: str = "uvloop", http: str = "httptools", tune_gc: bool = True, profile: Path | None = None,
                 env: dict[str, str] | None = None, timeout: float = 60.0) -> RouterProcess:
    cmd = [sys.executable, "-m", "loadtest.router_serve", "--model", str(model_dir), "--name", name,
           "--prefill", prefill, "--decode", decode, "--loop", loop, "--http", http]
    if not tune_gc:
        cmd.append("--no-tune-gc")
    if profile is not None:
        cmd += ["--profile", str(profile)]
    if cpus is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus, *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY "):
            return RouterProcess(line.split()[1], proc)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"router did not start: {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint dir: the tokenizer and context length")
    parser.add_argument("--name", default="tiny", help="the model name clients ask for")
    parser.add_argument("--prefill", action="append", required=True)
    parser.add_argument("--decode", action="append", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--http", choices=("httptools", "h11"), default="httptools")
    parser.add_argument("--profile", help="write cProfile stats here at exit")
    parser.add_argument("--no-tune-gc", dest="tune_gc", action="store_false",
                        help="leave the garbage collector at Python's defaults")
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
