"""The dist transport (gloo point-to-point over a pairwise group) between two processes.

This process is the decode side (a DistKVEndpoint: TCPStore on 127.0.0.1, port 0); a spawned child
(cluster/transfer/peer.py) is the prefill side and forms its pair group with us on first contact.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cluster.transfer import KVPoll, TransferSpec, create_receiver
from cluster.transfer.dist import DistKVEndpoint
from cluster.transfer.peer import SenderProcess, job, pages_landed

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


@pytest.fixture(scope="module")
def prefill(endpoint):
    with SenderProcess("dist", address=endpoint.address) as proc:
        yield proc


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
    receiver = create_receiver("dist", spec, *caches(), [0, 1, 2, 3, 4, 5], endpoint=endpoint)
    groups_before = endpoint.num_groups()
    with SenderProcess("dist", address=endpoint.address) as proc:  # a second prefill process: its own pair
        proc.run([job(spec, seed=4, mode="die")])
        proc.process.join(20)
        died = time.monotonic()
        assert proc.process.exitcode == 3
        assert wait_final([receiver], lease) == [KVPoll.FAILED]
        assert time.monotonic() - died < lease / 2, "noticed by the lease, not by the broken connection"
    assert "sender gone" in receiver.error
    close_and_join([receiver])
    assert endpoint.num_groups() == groups_before  # the broken pair was evicted, the healthy one kept
