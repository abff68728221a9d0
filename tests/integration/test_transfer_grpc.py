"""The gRPC transport between two processes: bit-exact pages, a corrupted message, a killed sender.

This process is the decode side (a grpc server with the KVTransferServicer, receivers writing into its
caches); a spawned child (cluster/transfer/peer.py) is the prefill side.
"""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest
import torch

from cluster.transfer import KVPoll, TransferSpec, create_receiver
from cluster.transfer.grpc import KVTransferServicer, close_all
from cluster.transfer.peer import SenderProcess, job, pages_landed

L, BS, H, D = 4, 16, 2, 32


def spec_for(tid: str, lease: float = 10.0) -> TransferSpec:
    return TransferSpec(tid, num_layers=L, block_size=BS, num_kv_heads=H, head_dim=D, dtype="bfloat16",
                        num_blocks=6, lease_seconds=lease)


def caches() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return ([torch.zeros(16, BS, H, D, dtype=torch.bfloat16) for _ in range(L)],
            [torch.zeros(16, BS, H, D, dtype=torch.bfloat16) for _ in range(L)])


def wait_final(receivers, timeout: float) -> list[KVPoll]:
    deadline = time.monotonic() + timeout
    while any(r.poll() in (KVPoll.WAITING, KVPoll.TRANSFERRING) for r in receivers) and time.monotonic() < deadline:
        time.sleep(0.005)
    return [r.poll() for r in receivers]


@pytest.fixture(scope="module")
def decode_server():
    servicer = KVTransferServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0).wait()
    close_all()
    assert len(servicer) == 0, "a receiver stayed registered"


def started(proc: SenderProcess, servicer: KVTransferServicer) -> SenderProcess:
    """Wait for the child's imports with one small transfer, so a busy machine's slow interpreter start
    does not eat into the leases the tests measure."""
    spec = spec_for(f"grpc-warm-up-{proc.process.pid}", lease=120.0)
    receiver = create_receiver("grpc", spec, *caches(), [0, 1, 2, 3, 4, 5], servicer=servicer)
    proc.run([job(spec, seed=0)])
    assert wait_final([receiver], 120) == [KVPoll.DONE] and proc.result(120)["states"] == ["DONE"]
    receiver.close()
    return proc


@pytest.fixture(scope="module")
def prefill(decode_server):
    # 4 KiB chunks: every 12 KiB layer crosses in several messages, boundaries inside pages
    with SenderProcess("grpc", target=decode_server[1], chunk_bytes=4096) as proc:
        yield started(proc, decode_server[0])


def test_concurrent_transfers_arrive_bit_exact(decode_server, prefill):
    servicer, _ = decode_server
    specs = [spec_for("grpc-ok-0"), spec_for("grpc-ok-1")]
    dests = [[9, 2, 14, 0, 5, 11], [1, 15, 3, 8, 12, 6]]
    stores = [caches(), caches()]
    receivers = [create_receiver("grpc", s, *c, d, servicer=servicer) for s, c, d in zip(specs, stores, dests, strict=True)]
    # one through send_layer, one gathered from a cache through send_layer_blocks
    prefill.run([job(specs[0], seed=1, first_token_id=11), job(specs[1], seed=2, first_token_id=22, from_cache=True)])
    assert wait_final(receivers, 20) == [KVPoll.DONE, KVPoll.DONE]
    assert [r.first_token_id for r in receivers] == [11, 22]
    assert prefill.result()["states"] == ["DONE", "DONE"]
    for spec, seed, (k, v), dest in zip(specs, (1, 2), stores, dests, strict=True):
        assert pages_landed(spec, seed, k, v, dest)
    for r in receivers:
        r.close()


def test_corrupted_message_fails_the_transfer(decode_server, prefill):
    servicer, _ = decode_server
    spec = spec_for("grpc-corrupt")
    receiver = create_receiver("grpc", spec, *caches(), [0, 1, 2, 3, 4, 5], servicer=servicer)
    prefill.run([job(spec, seed=3, mode="corrupt")])
    assert wait_final([receiver], 20) == [KVPoll.FAILED]
    assert "checksum mismatch in layer 1" in receiver.error
    assert prefill.result()["states"] == ["FAILED"]  # the refusal reached the sender
    receiver.close()


def test_receiver_abort_mid_transfer_stops_the_sender(decode_server, prefill):
    servicer, _ = decode_server
    spec = spec_for("grpc-abort")
    k, v = caches()
    receiver = create_receiver("grpc", spec, k, v, [0, 1, 2, 3, 4, 5], servicer=servicer)
    prefill.run([job(spec, seed=7, mode="slow")])
    deadline = time.monotonic() + 20
    while receiver.poll() == KVPoll.WAITING and time.monotonic() < deadline:
        time.sleep(0.002)
    receiver.abort()
    written = [c.clone() for c in k + v]
    result = prefill.result()
    assert result["states"] == ["FAILED"] and "refused" in result["errors"][0]
    assert all(torch.equal(a, b) for a, b in zip(written, k + v, strict=True)), "written after abort"
    receiver.close()


def test_killed_sender_fails_the_receiver_before_the_lease(decode_server):
    servicer, target = decode_server
    lease = 8.0
    spec = spec_for("grpc-killed", lease=lease)
    with SenderProcess("grpc", target=target, chunk_bytes=4096) as proc:
        started(proc, servicer)
        receiver = create_receiver("grpc", spec, *caches(), [0, 1, 2, 3, 4, 5], servicer=servicer)
        proc.run([job(spec, seed=4, mode="die")])
        proc.process.join(20)
        died = time.monotonic()
        assert proc.process.exitcode == 3
        assert wait_final([receiver], lease) == [KVPoll.FAILED]
        assert time.monotonic() - died < lease / 2, "noticed by the lease, not by the broken stream"
    assert "sender gone" in receiver.error
    receiver.close()
    close_all()
