"""A child process that plays the prefill side of transfers (integration tests and the bench).

The parent hosts the receivers (decode side), spawns `sender_main` with a transport, its endpoint and a
list of jobs, and drives it over a pipe with JSON messages (control only: the KV itself goes over the
transport under test). Pages are generated from a seed (`make_pages`), so the parent can rebuild what
was sent and compare bytes exactly.

Jobs in one batch run interleaved — layer l of every job, then layer l+1 — like one prefill step of a
batch of prompts. Modes: "ok"; "slow" (0.15 s between layers); "corrupt" (flips a byte of layer 1
after its checksum was taken); "die" (ships half the layers, then the process exits at once, as if
killed).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

import torch

from cluster.transfer import KVPoll, TransferSpec, create_sender
from cluster.transfer.sender_core import QueuedSender


def make_pages(spec: TransferSpec, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V pages [num_blocks, block_size, heads, head_dim], reproducible from the seed."""
    gen = torch.Generator().manual_seed(seed)
    shape = spec.page_shape
    ks = [torch.randn(shape, generator=gen).to(spec.torch_dtype) for _ in range(spec.num_layers)]
    vs = [torch.randn(shape, generator=gen).to(spec.torch_dtype) for _ in range(spec.num_layers)]
    return ks, vs


def job(spec: TransferSpec, seed: int, mode: str = "ok", first_token_id: int = 7,
        from_cache: bool = False) -> dict[str, Any]:
    """One transfer for the child. from_cache: the pages sit in shuffled blocks of a bigger cache and go out
    through send_layer_blocks (the engine's path) instead of send_layer."""
    return {"spec": asdict(spec), "seed": seed, "mode": mode, "first_token_id": first_token_id,
            "from_cache": from_cache}


def _as_cache(pages: list[torch.Tensor], seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The pages scattered into shuffled blocks of a cache with spare blocks; and where they went."""
    num_blocks = pages[0].shape[0]
    total = num_blocks + 7
    ids = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num_blocks]
    caches = []
    for p in pages:
        cache = torch.zeros((total, *p.shape[1:]), dtype=p.dtype)
        cache[ids] = p
        caches.append(cache)
    return caches, ids


def _corrupting(sender: QueuedSender) -> None:
    """Flip the first byte of layer 1's first message after its checksum was taken (a bit error in flight)."""
    record = sender._record

    def corrupt_record(layer_idx: int, offset: int, data, *args):
        value = record(layer_idx, offset, data, *args)
        if layer_idx == 1 and offset == 0:
            data[0] = int(data[0]) ^ 0xFF
        return value

    sender._record = corrupt_record  # type: ignore[method-assign]


def _wait(senders: list, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(s.poll() in (KVPoll.WAITING, KVPoll.TRANSFERRING) for s in senders):
        time.sleep(0.002)
    return [s.poll().name for s in senders]


def run_batch(kind: str, endpoint: dict[str, Any], jobs: list[dict[str, Any]], timeout_s: float = 60.0) -> dict:
    specs = [TransferSpec(**j["spec"]) for j in jobs]
    pages = [make_pages(spec, j["seed"]) for spec, j in zip(specs, jobs, strict=True)]
    sources = [(*_as_cache(ks, j["seed"]), _as_cache(vs, j["seed"])[0]) if j.get("from_cache") else None
               for (ks, vs), j in zip(pages, jobs, strict=True)]
    senders = [create_sender(kind, spec, **endpoint) for spec in specs]
    for sender, j in zip(senders, jobs, strict=True):
        if j["mode"] == "corrupt":
            _corrupting(sender)
    start = time.monotonic()  # CLOCK_MONOTONIC: comparable with the parent's clock (same machine)
    num_layers = max(spec.num_layers for spec in specs)
    for layer in range(num_layers):
        for sender, j, (ks, vs), source in zip(senders, jobs, pages, sources, strict=True):
            if j["mode"] == "die" and layer == sender.spec.num_layers // 2:
                while sender.bytes_sent < layer * sender.spec.layer_nbytes:  # shipped, not just queued
                    time.sleep(0.001)
                time.sleep(0.2)
                os._exit(3)  # no cleanup, no goodbye: like SIGKILL
            if layer < sender.spec.num_layers and source is not None:
                k_caches, ids, v_caches = source
                sender.send_layer_blocks(layer, k_caches[layer], v_caches[layer], ids)
            elif layer < sender.spec.num_layers:
                sender.send_layer(layer, ks[layer], vs[layer])
            if j["mode"] == "slow":
                time.sleep(0.15)  # a long prefill: the receiver sees the layers one by one
    for sender, j in zip(senders, jobs, strict=True):
        sender.finish(j["first_token_id"])
    states = _wait(senders, timeout_s)
    elapsed = time.monotonic() - start
    errors = [getattr(s, "error", None) for s in senders]
    for sender in senders:
        sender.close()
    return {"states": states, "errors": errors, "start": start, "seconds": elapsed}


def sender_main(kind: str, endpoint_json: str, conn: Connection) -> None:
    """Child entry point: for each {"jobs": [...]} received, run the batch and answer with its result;
    an empty message ends the process."""
    torch.set_num_threads(1)
    endpoint = json.loads(endpoint_json)
    if kind == "dist":  # as a worker has them from loading its model: not on the first transfer's clock
        from cluster.transfer import host_copy
        host_copy.available()
    try:
        while True:
            request = conn.recv_bytes()
            if not request:
                break
            result = run_batch(kind, endpoint, json.loads(request)["jobs"])
            conn.send_bytes(json.dumps(result).encode())
    finally:
        if kind == "dist":
            from cluster.transfer.dist import close_all
            close_all()
        elif kind == "grpc":
            from cluster.transfer.grpc import close_all
            close_all()


class SenderProcess:
    """Parent side: a spawned `sender_main` child. `run(jobs)` sends a batch and returns without waiting;
    `result()` waits for the child's report. Always `close()` (or use `with`)."""

    def __init__(self, kind: str, **endpoint: Any) -> None:
        ctx = mp.get_context("spawn")  # fork would copy the parent's threads' locks (gRPC, gloo)
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=sender_main, args=(kind, json.dumps(endpoint), child_conn), daemon=True)
        self.process.start()
        child_conn.close()

    def run(self, jobs: list[dict[str, Any]]) -> None:
        self._conn.send_bytes(json.dumps({"jobs": jobs}).encode())

    def result(self, timeout_s: float = 60.0) -> dict[str, Any]:
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"sender process gave no result in {timeout_s}s")
        return json.loads(self._conn.recv_bytes())

    def close(self, timeout_s: float = 10.0) -> None:
        if self.process.is_alive():
            try:
                self._conn.send_bytes(b"")
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()

    def __enter__(self) -> SenderProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pages_landed(spec: TransferSpec, seed: int, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 dest_block_ids: list[int]) -> bool:
    """Whether the blocks hold exactly (bit for bit) the pages a sender made from `seed`."""
    ks, vs = make_pages(spec, seed)
    heads = slice(spec.kv_head_start, spec.kv_head_end)

    def raw(t: torch.Tensor) -> bytes:
        return t.contiguous().view(torch.uint8).numpy().tobytes()

    return all(raw(k_caches[i][dest_block_ids][:, :, heads]) == raw(ks[i])
               and raw(v_caches[i][dest_block_ids][:, :, heads]) == raw(vs[i]) for i in range(spec.num_layers))
