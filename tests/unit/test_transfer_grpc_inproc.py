"""The gRPC transport in one process: chunk boundaries inside pages, refusals, the grpc.aio servicer."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch

from cluster.transfer import KVPoll, TransferSpec, create_receiver, create_sender
from cluster.transfer.grpc import AsyncKVTransferServicer, KVTransferServicer, close_all, pb, pb_grpc

L = 2


def spec_for(tid: str, **kw) -> TransferSpec:
    return TransferSpec(tid, num_layers=L, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16",
                        num_blocks=3, **kw)


def wait_final(obj, timeout: float = 10.0) -> KVPoll:
    deadline = time.monotonic() + timeout
    while obj.poll() in (KVPoll.WAITING, KVPoll.TRANSFERRING) and time.monotonic() < deadline:
        time.sleep(0.002)
    return obj.poll()


@pytest.fixture
def server():
    servicer = KVTransferServicer()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer.add_to_server(srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield servicer, f"127.0.0.1:{port}"
    close_all()
    srv.stop(0).wait()
    assert len(servicer) == 0


def send_all(sender, pages, token: int = 77) -> None:
    for layer, (k, v) in enumerate(pages):
        sender.send_layer(layer, k, v)
    sender.finish(token)


def make_pages(spec: TransferSpec):
    return [(torch.randn(spec.page_shape).half(), torch.randn(spec.page_shape).half()) for _ in range(L)]


def test_odd_chunk_sizes_reassemble_bit_exact(server):
    servicer, target = server
    spec = spec_for("chunks")
    k_caches = [torch.zeros(6, 4, 2, 8, dtype=torch.float16) for _ in range(L)]
    v_caches = [torch.zeros_like(c) for c in k_caches]
    receiver = create_receiver("grpc", spec, k_caches, v_caches, [5, 1, 3], servicer=servicer)
    sender = create_sender("grpc", spec, target=target, chunk_bytes=1000)  # boundaries fall mid-page
    pages = make_pages(spec)
    send_all(sender, pages)
    assert wait_final(receiver) == KVPoll.DONE and receiver.first_token_id == 77
    assert wait_final(sender) == KVPoll.DONE and sender.ack.ok
    assert sender.ack.bytes_received == spec.total_nbytes
    for layer, (k, v) in enumerate(pages):
        assert torch.equal(k_caches[layer][[5, 1, 3]], k) and torch.equal(v_caches[layer][[5, 1, 3]], v)
    sender.close()
    receiver.close()


def test_unknown_transfer_is_refused(server):
    _, target = server
    spec = spec_for("nobody-waits")
    sender = create_sender("grpc", spec, target=target)
    send_all(sender, make_pages(spec))
    assert wait_final(sender) == KVPoll.FAILED and "no receiver" in sender.error
    sender.close()


def test_receiver_abort_refuses_the_stream_and_writes_nothing(server):
    servicer, target = server
    spec = spec_for("aborted")
    k_caches = [torch.zeros(6, 4, 2, 8, dtype=torch.float16) for _ in range(L)]
    v_caches = [torch.zeros_like(c) for c in k_caches]
    receiver = create_receiver("grpc", spec, k_caches, v_caches, [0, 1, 2], servicer=servicer)
    receiver.abort()
    sender = create_sender("grpc", spec, target=target)
    send_all(sender, make_pages(spec))
    assert wait_final(sender) == KVPoll.FAILED
    assert all(c.eq(0).all() for c in k_caches + v_caches)
    sender.close()
    receiver.close()


def test_stream_ending_without_final_fails_the_receiver(server):
    servicer, target = server
    spec = spec_for("truncated")
    k_caches = [torch.zeros(6, 4, 2, 8, dtype=torch.float16) for _ in range(L)]
    v_caches = [torch.zeros_like(c) for c in k_caches]
    receiver = create_receiver("grpc", spec, k_caches, v_caches, [0, 1, 2], servicer=servicer)
    chunk = pb.KVChunk(transfer_id="truncated", kind=pb.KV_CHUNK_KIND_DATA, layer_idx=0, data=b"\0" * 8)
    with grpc.insecure_channel(target) as channel:
        ack = pb_grpc.WorkerStub(channel).PushKV(iter([chunk]), timeout=5)
    assert not ack.ok
    assert receiver.poll() == KVPoll.FAILED
    receiver.close()


def test_aio_servicer():
    spec = spec_for("aio")
    k_caches = [torch.zeros(6, 4, 2, 8, dtype=torch.float16) for _ in range(L)]
    v_caches = [torch.zeros_like(c) for c in k_caches]
    pages = make_pages(spec)
    servicer = AsyncKVTransferServicer()
    ready, stop = threading.Event(), threading.Event()
    box: dict = {}

    async def serve() -> None:
        srv = grpc.aio.server()
        pb_grpc.add_WorkerServicer_to_server(servicer, srv)
        box["port"] = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.01)
        await srv.stop(0)

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(10)
        receiver = create_receiver("grpc", spec, k_caches, v_caches, [2, 4, 0], servicer=servicer)
        sender = create_sender("grpc", spec, target=f"127.0.0.1:{box['port']}", chunk_bytes=300)
        send_all(sender, pages, token=5)
        assert wait_final(receiver) == KVPoll.DONE and receiver.first_token_id == 5
        assert wait_final(sender) == KVPoll.DONE
        for layer, (k, v) in enumerate(pages):
            assert torch.equal(k_caches[layer][[2, 4, 0]], k) and torch.equal(v_caches[layer][[2, 4, 0]], v)
        sender.close()
        receiver.close()
    finally:
        close_all()
        stop.set()
        thread.join(10)
