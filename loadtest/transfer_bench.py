"""Loopback throughput of each KV transport for one realistic request, against raw gloo and a memcpy.

    python -m loadtest.transfer_bench [--tokens 2048 --layers 8 --kv-heads 4 --head-dim 64 --reps 5]
                                      [--paths memcpy,gloo,local,grpc,dist]

The request: a prompt of --tokens tokens in blocks of 16, fp32, K and V of every layer — 32 MiB for the
defaults (the `small` preset's KV shape). Each row moves those bytes once per repetition, after a
warm-up repetition (connections, pair groups); all rows run --rounds times, interleaved, and the table
reports the median of every repetition:
- memcpy: torch copy_ of the same per-layer tensors into preallocated ones (one thread): the ceiling;
- gloo send/recv (raw): a child process sends the per-layer tensors to this one over a pairwise gloo
  group, no framing, no checksums: what the dist transport is built on;
- local / grpc / dist: the transports end to end, from the sender's first `send_layer_blocks` (gathering
  the request's blocks from the prefill worker's cache, as the engine does) to receiver DONE — packing,
  checksums, framing and the scatter into shuffled destination blocks included. grpc
  and dist senders run in a child process; local runs in this one. The sender is made just before the
  clock starts, as the engine makes it before the prefill runs: the dist sender's handshake (announce,
  pair group) starts then and overlaps the first layer's gather, as it overlaps compute in a worker.
Times across processes use CLOCK_MONOTONIC, which both processes share.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import statistics
import time
from concurrent import futures
from multiprocessing.connection import Connection

import torch

from cluster.transfer import KVPoll, TransferSpec, create_receiver, create_sender
from cluster.transfer.pair_group import make_pair_group
from cluster.transfer.peer import SenderProcess, job
from loadtest.report import write_section

MiB = 1 << 20
PATHS = {  # --paths name -> table row, in the table's order
    "memcpy": "memcpy (torch copy_)",
    "gloo": "gloo send/recv (raw)",
    "local": "local transport",
    "grpc": "grpc transport",
    "dist": "dist transport",
}


def request_spec(args: argparse.Namespace, tid: str) -> TransferSpec:
    return TransferSpec(tid, num_layers=args.layers, block_size=args.block_size, num_kv_heads=args.kv_heads,
                        head_dim=args.head_dim, dtype="float32", num_blocks=args.tokens // args.block_size,
                        lease_seconds=60.0)


def dest(spec: TransferSpec, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Decode-side caches with room to spare and a shuffled block list, as a real worker would have."""
    total = spec.num_blocks + 16
    shape = (total, spec.block_size, spec.num_kv_heads, spec.head_dim)
    k = [torch.zeros(shape) for _ in range(spec.num_layers)]
    v = [torch.zeros(shape) for _ in range(spec.num_layers)]
    blocks = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: spec.num_blocks].tolist()
    return k, v, blocks


def wait_done(receiver, timeout_s: float = 60.0) -> float:
    """When the receiver reached DONE. `receiver.wait` blocks on the receiver's own completion event:
    polling every 0.2 ms instead cost ~10% of a 2-core machine, taken from the transfer it measures."""
    state = receiver.wait(timeout_s)
    done = time.monotonic()
    if state in (KVPoll.WAITING, KVPoll.TRANSFERRING):
        raise TimeoutError("transfer did not finish")
    if state != KVPoll.DONE:
        raise RuntimeError(f"transfer failed: {receiver.error}")
    return done


def bench_memcpy(spec: TransferSpec, reps: int) -> list[float]:
    half = spec.layer_nbytes // 2 // 4
    src = [torch.randn(half) for _ in range(2 * spec.num_layers)]
    dst = [torch.empty(half) for _ in range(2 * spec.num_layers)]
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        for s, d in zip(src, dst, strict=True):
            d.copy_(s)
        times.append(time.perf_counter() - start)
    return times[1:]


def _raw_gloo_sender(port: int, layer_nbytes: int, num_layers: int, reps: int, conn: Connection) -> None:
    torch.set_num_threads(1)
    from torch.distributed import TCPStore
    store = TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=30))
    group = make_pair_group(store, "raw", 0, "127.0.0.1", 30.0)
    layers = [torch.randint(0, 255, (layer_nbytes,), dtype=torch.uint8) for _ in range(num_layers)]
    for _ in range(reps + 1):
        conn.recv_bytes()  # the receiver has posted its recvs
        stamp = torch.tensor([time.monotonic()], dtype=torch.float64)
        works = [group.send([stamp], 1, 0)] + [group.send([t], 1, 0) for t in layers]
        for w in works:
            w.wait()


def bench_raw_gloo(spec: TransferSpec, reps: int) -> list[float]:
    from torch.distributed import TCPStore
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30))
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_raw_gloo_sender,
                       args=(store.port, spec.layer_nbytes, spec.num_layers, reps, child_conn), daemon=True)
    proc.start()
    try:
        group = make_pair_group(store, "raw", 1, "127.0.0.1", 30.0)
        stamp = torch.empty(1, dtype=torch.float64)
        bufs = [torch.empty(spec.layer_nbytes, dtype=torch.uint8) for _ in range(spec.num_layers)]
        times = []
        for _ in range(reps + 1):
            works = [group.recv([stamp], 0, 0)] + [group.recv([b], 0, 0) for b in bufs]
            conn.send_bytes(b"go")
            for w in works:
                w.wait()
            times.append(time.monotonic() - stamp.item())
        return times[1:]
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def bench_local(spec_args: argparse.Namespace, reps: int) -> list[float]:
    times = []
    for rep in range(reps + 1):
        spec = request_spec(spec_args, f"bench-local-{rep}")
        src_k, src_v, src_blocks = dest(spec, rep + 100)  # the prefill worker's cache
        for cache in src_k + src_v:
            cache.normal_()
        k, v, blocks = dest(spec, rep)
        receiver = create_receiver("local", spec, k, v, blocks)
        sender = create_sender("local", spec)
        start = time.monotonic()
        for layer in range(spec.num_layers):
            sender.send_layer_blocks(layer, src_k[layer], src_v[layer], src_blocks)
        sender.finish(1)
        times.append(wait_done(receiver) - start)
        sender.close()
        receiver.close()
    return times[1:]


def bench_remote(kind: str, spec_args: argparse.Namespace, reps: int) -> list[float]:
    from cluster.transfer import grpc as grpc_transport  # noqa: F401  (generates code before the child starts)

    times = []
    with _decode_side(kind) as (endpoint_kwargs, receiver_kwargs), SenderProcess(kind, **endpoint_kwargs) as proc:
        for rep in range(reps + 1):
            spec = request_spec(spec_args, f"bench-{kind}-{rep}")
            k, v, blocks = dest(spec, rep)
            receiver = create_receiver(kind, spec, k, v, blocks, **receiver_kwargs)
            proc.run([job(spec, seed=rep, from_cache=True)])
            done = wait_done(receiver)
            result = proc.result()
            if result["states"] != ["DONE"]:
                raise RuntimeError(f"{kind} sender: {result['errors']}")
            times.append(done - result["start"])
            receiver.close()
    return times[1:]


class _decode_side:  # noqa: N801  (a context manager used like a function)
    """The receiving end of a remote transport: (sender endpoint kwargs, receiver kwargs)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __enter__(self) -> tuple[dict, dict]:
        if self.kind == "dist":
            from cluster.transfer.dist import DistKVEndpoint
            self.endpoint = DistKVEndpoint()
            return {"address": self.endpoint.address}, {"endpoint": self.endpoint}
        import grpc

        from cluster.transfer.grpc import KVTransferServicer
        self.servicer = KVTransferServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.servicer.add_to_server(self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return {"target": f"127.0.0.1:{port}"}, {"servicer": self.servicer}

    def __exit__(self, *exc: object) -> None:
        if self.kind == "dist":
            self.endpoint.close()
        else:
            self.server.stop(0).wait()


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3,
                        help="run every row this many times, interleaved, so a busy neighbour hits all alike")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated subset of {','.join(PATHS)} (raw gloo always runs: the reference)")
    parser.add_argument("--write", help="rewrite this markdown file's transfer section with the table")
    args = parser.parse_args(argv)
    paths = {p.strip() for p in args.paths.split(",")} | {"gloo"}
    if not paths <= set(PATHS):
        parser.error(f"--paths: unknown {sorted(paths - set(PATHS))}; choose from {','.join(PATHS)}")
    torch.set_num_threads(1)
    spec = request_spec(args, "shape")
    nbytes = spec.total_nbytes
    runs = {
        "memcpy": lambda: bench_memcpy(spec, args.reps),
        "gloo": lambda: bench_raw_gloo(spec, args.reps),
        "local": lambda: bench_local(args, args.reps),
        "grpc": lambda: bench_remote("grpc", args, args.reps),
        "dist": lambda: bench_remote("dist", args, args.reps),
    }
    runs = {PATHS[path]: run for path, run in runs.items() if path in paths}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name] += run()
    rows: list[tuple[str, float, float]] = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append((name, med * 1e3, nbytes / med / 1e9))

    print(f"KV transfer, loopback: {args.tokens} tokens x {args.layers} layers x {args.kv_heads} kv heads x "
          f"head_dim {args.head_dim}, fp32 = {nbytes / MiB:.1f} MiB; median of {args.rounds} x {args.reps}")
    print(f"{'path':<24}{'ms':>10}{'GB/s':>10}{'vs gloo':>10}")
    gloo = dict((name, gbs) for name, _, gbs in rows)[PATHS["gloo"]]
    for name, ms, gbs in rows:
        print(f"{name:<24}{ms:>10.1f}{gbs:>10.2f}{gbs / gloo:>9.0%}")
    if args.write:
        write_section(args.write, "transfer-bench", "KV transfer transports", _table(args, rows, nbytes))
    return rows


def _table(args: argparse.Namespace, rows: list[tuple[str, float, float]], nbytes: int) -> str:
    gloo = dict((name, gbs) for name, _, gbs in rows)[PATHS["gloo"]]
    return "\n".join([
        f"Date: {datetime.date.today()} · {args.tokens} tokens x {args.layers} layers x {args.kv_heads} KV heads x "
        f"head_dim {args.head_dim}, fp32 = {nbytes / MiB:.0f} MiB on loopback · median of {args.rounds} x "
        f"{args.reps} · command: `python -m loadtest.transfer_bench`",
        "",
        "| path | ms | GB/s | vs raw gloo |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {ms:.1f} | {gbs:.2f} | {gbs / gloo:.0%} |" for name, ms, gbs in rows),
    ])


if __name__ == "__main__":
    main()
