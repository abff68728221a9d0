"""The dist transport (gloo point-to-point over a pairwise group) between two processes.

This process is the decode side (a DistKVEndpoint: TCPStore on 127.0.0.1, port 0); a spawned child
(cluster/transfer/peer.py) is the prefill side and forms its pair group with us on first contact.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cluster.transfer import KVPoll, TransferSpec, create_receiver, create_sender
from cluster.transfer.dist import DistKVEndpoint, close_all
from cluster.transfer.pair_group import CHUNK_BYTES, SlotPlan
from cluster.transfer.peer import SenderProcess, job, make_pages, pages_landed

L, BS, H, D = 4, 16, 2, 32


def spec_for(tid: str, lease: float = 10.0, dtype: str = "float32") -> TransferSpec:
    return TransferSpec(tid, num_layers=L, block_size=BS, num_kv_heads=H, head_dim=D, dtype=dtype,
                        num_blocks=6, lease_seconds=lease)


def caches(dtype=torch.float32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return ([torch.zeros(16, BS, H, D, dtype=dtype) for _ in range(L)],
            [torch.zeros(16, BS, H, D, dtype=dtype) for _ in range(L)])


def wait_final(receivers, timeout: float) -> list[KVPoll]:
    deadline = time.monotonic() + timeout
    while any(r.poll() in (KVPoll.WAITING, KVPoll.TRANSFERRING) for r in receivers) and time.monotonic() < deadline:
        time.sleep(0.005)
    return [r.poll() for r in receivers]


def close_and_join(receivers) -> None:
    for r in receivers:
        r.close()
        assert r.join(5), "receiver thread still running"


@pytest.fixture(scope="module")
def endpoint():
    ep = DistKVEndpoint("127.0.0.1", 0)
    assert ep.port > 0
    yield ep
    ep.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("kv-recv", "kv-send"))]


def started(proc: SenderProcess, endpoint: DistKVEndpoint) -> SenderProcess:
    """Wait for the child's imports and its pair group with one small transfer, so a busy machine's slow
    interpreter start does not eat into the leases the tests measure."""
    spec = spec_for(f"dist-warm-up-{proc.process.pid}", lease=120.0)
    receiver = create_receiver("dist", spec, *caches(), [0, 1, 2, 3, 4, 5], endpoint=endpoint)
    proc.run([job(spec, seed=0)])
    assert wait_final([receiver], 120) == [KVPoll.DONE] and proc.result(120)["states"] == ["DONE"]
    close_and_join([receiver])
    return proc


@pytest.fixture(scope="module")
def prefill(endpoint):
    with SenderProcess("dist", address=endpoint.address) as proc:
        yield started(proc, endpoint)


def test_concurrent_transfers_arrive_bit_exact(endpoint, prefill):
    specs = [spec_for("dist-ok-0"), spec_for("dist-ok-1", dtype="bfloat16")]
    dests = [[9, 2, 14, 0, 5, 11], [1, 15, 3, 8, 12, 6]]
    stores = [caches(), caches(torch.bfloat16)]
    receivers = [create_receiver("dist", s, *c, d, endpoint=endpoint) for s, c, d in zip(specs, stores, dests, strict=True)]
    # one through send_layer, one gathered from a cache through send_layer_blocks
    prefill.run([job(specs[0], seed=1, first_token_id=11), job(specs[1], seed=2, first_token_id=22, from_cache=True)])
    assert wait_final(receivers, 20) == [KVPoll.DONE, KVPoll.DONE]
    assert [r.first_token_id for r in receivers] == [11, 22]
    assert prefill.result()["states"] == ["DONE", "DONE"]
    for spec, seed, (k, v), dest in zip(specs, (1, 2), stores, dests, strict=True):
        assert pages_landed(spec, seed, k, v, dest)
    close_and_join(receivers)
    assert endpoint.num_groups() == 1  # both transfers shared one pair group (one gloo tag each)


def test_corrupted_message_fails_and_the_pair_stays_usable(endpoint, prefill):
    spec = spec_for("dist-corrupt")
    receiver = create_receiver("dist", spec, *caches(), [0, 1, 2, 3, 4, 5], endpoint=endpoint)
    prefill.run([job(spec, seed=3, mode="corrupt")])
    assert wait_final([receiver], 20) == [KVPoll.FAILED]
    assert "checksum mismatch in layer 1" in receiver.error
    result = prefill.result()
    # no ack channel: the sender may have handed everything to gloo before the receiver told it to stop
    assert result["states"] == ["DONE"] or "receiver aborted" in result["errors"][0]
    close_and_join([receiver])
    # the receiver drained the rest of the stream, so the same group carries the next transfer
    spec = spec_for("dist-after-corrupt")
    k, v = caches()
    receiver = create_receiver("dist", spec, k, v, [5, 4, 3, 2, 1, 0], endpoint=endpoint)
    prefill.run([job(spec, seed=5)])
    assert wait_final([receiver], 20) == [KVPoll.DONE]
    assert prefill.result()["states"] == ["DONE"]
    assert pages_landed(spec, 5, k, v, [5, 4, 3, 2, 1, 0])
    close_and_join([receiver])
    assert endpoint.num_groups() == 1


def test_receiver_abort_mid_transfer_stops_the_sender(endpoint, prefill):
    spec = spec_for("dist-abort")
    k, v = caches()
    receiver = create_receiver("dist", spec, k, v, [0, 1, 2, 3, 4, 5], endpoint=endpoint)
    prefill.run([job(spec, seed=7, mode="slow")])
    deadline = time.monotonic() + 20
    while receiver.poll() == KVPoll.WAITING and time.monotonic() < deadline:
        time.sleep(0.002)
    receiver.abort()  # e.g. the client went away while layer 0 was landing
    written = [c.clone() for c in k + v]
    result = prefill.result()
    assert result["states"] == ["FAILED"] and "receiver aborted" in result["errors"][0]
    close_and_join([receiver])  # drained: the ABORT and the PAD for its posted slot arrived
    assert all(torch.equal(a, b) for a, b in zip(written, k + v, strict=True)), "written after abort"
    spec = spec_for("dist-after-abort")
    k, v = caches()
    receiver = create_receiver("dist", spec, k, v, [3, 4, 5, 0, 1, 2], endpoint=endpoint)
    prefill.run([job(spec, seed=8)])
    assert wait_final([receiver], 20) == [KVPoll.DONE] and prefill.result()["states"] == ["DONE"]
    assert pages_landed(spec, 8, k, v, [3, 4, 5, 0, 1, 2])
    close_and_join([receiver])
    assert endpoint.num_groups() == 1


def test_a_pair_dropped_by_the_decode_side_is_rebuilt(endpoint, prefill):
    (old_pair,) = endpoint.pair_ids()
    endpoint.evict(old_pair)  # as after a corrupt header: the sender side did not notice anything
    spec = spec_for("dist-new-pair")
    k, v = caches()
    receiver = create_receiver("dist", spec, k, v, [2, 0, 4, 1, 5, 3], endpoint=endpoint)
    prefill.run([job(spec, seed=9)])
    assert wait_final([receiver], 20) == [KVPoll.DONE] and prefill.result()["states"] == ["DONE"]
    assert pages_landed(spec, 9, k, v, [2, 0, 4, 1, 5, 3])
    close_and_join([receiver])
    assert len(endpoint.pair_ids()) == 1 and endpoint.pair_ids() != [old_pair]


def test_receiver_that_gave_up_is_never_sent_to(endpoint, prefill):
    spec = spec_for("dist-late", lease=0.2)
    k, v = caches()
    receiver = create_receiver("dist", spec, k, v, [0, 1, 2, 3, 4, 5], endpoint=endpoint)
    assert wait_final([receiver], 5) == [KVPoll.FAILED] and "lease" in receiver.error
    close_and_join([receiver])
    prefill.run([job(spec, seed=6)])  # the prefill comes after the lease: the key is already claimed
    result = prefill.result()
    assert result["states"] == ["FAILED"] and "gave up" in result["errors"][0]
    assert all(c.eq(0).all() for c in k + v)


def test_killed_sender_fails_the_receiver_before_the_lease(endpoint):
    lease = 8.0
    spec = spec_for("dist-killed", lease=lease)
    groups_before = endpoint.num_groups()
    with SenderProcess("dist", address=endpoint.address) as proc:  # a second prefill process: its own pair
        started(proc, endpoint)
        receiver = create_receiver("dist", spec, *caches(), [0, 1, 2, 3, 4, 5], endpoint=endpoint)
        proc.run([job(spec, seed=4, mode="die")])
        proc.process.join(20)
        died = time.monotonic()
        assert proc.process.exitcode == 3
        assert wait_final([receiver], lease) == [KVPoll.FAILED]
        assert time.monotonic() - died < lease / 2, "noticed by the lease, not by the broken connection"
    assert "sender gone" in receiver.error
    close_and_join([receiver])
    assert endpoint.num_groups() == groups_before  # the broken pair was evicted, the healthy one kept


BIG_BLOCKS = -(-5 * CHUNK_BYTES // (4 * 16 * 4 * 64 * 4))  # of 16 KiB: a layer (K and V) is 2.5 chunks


def big_spec(tid: str) -> TransferSpec:
    """Layers cut into 3 chunks (the middle one holds K and V blocks), more slots than recvs posted."""
    layers = SlotPlan(TransferSpec("probe", 100, 16, 4, 64, "float32", BIG_BLOCKS)).depth // 3 + 1
    return TransferSpec(tid, num_layers=layers, block_size=16, num_kv_heads=4, head_dim=64, dtype="float32",
                        num_blocks=BIG_BLOCKS, lease_seconds=20.0)


def big_caches() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    layers = big_spec("shape").num_layers
    return ([torch.zeros(BIG_BLOCKS + 10, 16, 4, 64) for _ in range(layers)],
            [torch.zeros(BIG_BLOCKS + 10, 16, 4, 64) for _ in range(layers)])


def test_layers_cut_into_chunks_with_fewer_recvs_posted_than_slots(endpoint, prefill):
    plan = SlotPlan(big_spec("plan"))
    assert len(plan.chunks) == 3 and len(plan.chunks[1].pieces) == 2  # the shape this test is about
    assert plan.depth < plan.final_slot + 1
    dest = torch.randperm(BIG_BLOCKS + 10, generator=torch.Generator().manual_seed(0))[:BIG_BLOCKS].tolist()
    spec = big_spec("dist-chunked")
    k, v = big_caches()
    receiver = create_receiver("dist", spec, k, v, dest, endpoint=endpoint)
    prefill.run([job(spec, seed=12, first_token_id=5, from_cache=True)])
    assert wait_final([receiver], 30) == [KVPoll.DONE] and receiver.first_token_id == 5
    assert prefill.result()["states"] == ["DONE"]
    assert pages_landed(spec, 12, k, v, dest)
    close_and_join([receiver])


def test_abort_pads_every_posted_slot_so_the_pair_carries_on(endpoint, prefill):
    spec = big_spec("dist-chunked-abort")
    k, v = big_caches()
    receiver = create_receiver("dist", spec, k, v, list(range(BIG_BLOCKS)), endpoint=endpoint)
    prefill.run([job(spec, seed=13, mode="slow")])
    deadline = time.monotonic() + 20
    while receiver.poll() == KVPoll.WAITING and time.monotonic() < deadline:
        time.sleep(0.002)
    receiver.abort()
    result = prefill.result()
    assert result["states"] == ["FAILED"] and "receiver aborted" in result["errors"][0]
    close_and_join([receiver])  # drained: ABORT, then a PAD in each of the depth - 1 slots still posted
    spec = big_spec("dist-chunked-after-abort")
    k, v = big_caches()
    receiver = create_receiver("dist", spec, k, v, list(range(10, BIG_BLOCKS + 10)), endpoint=endpoint)
    prefill.run([job(spec, seed=14)])
    assert wait_final([receiver], 30) == [KVPoll.DONE] and prefill.result()["states"] == ["DONE"]
    assert pages_landed(spec, 14, k, v, list(range(10, BIG_BLOCKS + 10)))
    close_and_join([receiver])


def test_a_sender_aborted_before_its_first_layer_leaves_the_pair_usable():
    """The handshake starts when the sender is made; aborting before any layer sends ABORT in slot 0 and
    a PAD for the one other slot a receiver posts while idle. Both sides in this process (own endpoint)."""
    ep = DistKVEndpoint("127.0.0.1", 0)
    try:
        spec = big_spec("dist-abort-before-data")
        receiver = create_receiver("dist", spec, *big_caches(), list(range(BIG_BLOCKS)), endpoint=ep)
        sender = create_sender("dist", spec, address=ep.address)
        deadline = time.monotonic() + 20
        while ep.num_groups() == 0 and time.monotonic() < deadline:  # handshake done: recvs get posted
            time.sleep(0.002)
        time.sleep(0.05)
        sender.abort()
        assert wait_final([receiver], 20) == [KVPoll.FAILED] and "sender aborted" in receiver.error
        close_and_join([receiver])
        assert sender.join(5) and sender.poll() == KVPoll.FAILED
        spec = big_spec("dist-after-abort-before-data")
        k, v = big_caches()
        receiver = create_receiver("dist", spec, k, v, list(range(5, BIG_BLOCKS + 5)), endpoint=ep)
        sender = create_sender("dist", spec, address=ep.address)
        ks, vs = make_pages(spec, seed=15)
        for layer in range(spec.num_layers):
            sender.send_layer(layer, ks[layer], vs[layer])
        sender.finish(3)
        assert wait_final([receiver], 20) == [KVPoll.DONE] and receiver.first_token_id == 3
        assert sender.join(5) and sender.poll() == KVPoll.DONE
        assert pages_landed(spec, 15, k, v, list(range(5, BIG_BLOCKS + 5)))
        close_and_join([receiver])
        assert ep.num_groups() == 1
    finally:
        close_all()
        ep.close()
