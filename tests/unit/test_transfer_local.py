"""The local transport end to end: pages land bit-exact in shuffled blocks, partial ranges, failure paths."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cluster.transfer import KVPoll, TransferSpec, create_receiver, create_sender
from cluster.transfer.local import LocalChannel

L, BS, H, D = 3, 4, 2, 8


def spec_for(tid: str, num_blocks: int, **kw) -> TransferSpec:
    return TransferSpec(tid, num_layers=L, block_size=BS, num_kv_heads=H, head_dim=D,
                        dtype=kw.pop("dtype", "bfloat16"), num_blocks=num_blocks, **kw)


def caches(num_blocks: int, dtype=torch.bfloat16, fill: float = 0.0) -> tuple[list, list]:
    return ([torch.full((num_blocks, BS, H, D), fill, dtype=dtype) for _ in range(L)],
            [torch.full((num_blocks, BS, H, D), fill, dtype=dtype) for _ in range(L)])


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def wait_final(obj, timeout: float = 5.0) -> KVPoll:
    deadline = time.monotonic() + timeout
    while obj.poll() in (KVPoll.WAITING, KVPoll.TRANSFERRING) and time.monotonic() < deadline:
        time.sleep(0.001)
    return obj.poll()


@pytest.fixture
def channel() -> LocalChannel:
    ch = LocalChannel()
    yield ch
    assert len(ch) == 0, "a receiver stayed registered"


def sender_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kv-send-")]


def test_pages_land_in_shuffled_blocks_bit_exact(channel):
    src_k, src_v = caches(12)
    for c in src_k + src_v:
        c.copy_(torch.randn(c.shape).bfloat16())
    src_table = [11, 2, 7, 0, 5]
    dst_table = [3, 9, 1, 6, 4]  # decode-side physical blocks, shuffled
    dst_k, dst_v = caches(10)
    spec = spec_for("shuffled", len(src_table))
    receiver = create_receiver("local", spec, dst_k, dst_v, dst_table, channel=channel)
    sender = create_sender("local", spec, channel=channel)
    assert receiver.poll() == KVPoll.WAITING
    idx = torch.tensor(src_table)
    for layer in range(L):
        sender.send_layer(layer, src_k[layer][idx], src_v[layer][idx])
    sender.finish(1234)
    assert wait_final(receiver) == KVPoll.DONE and receiver.first_token_id == 1234
    assert wait_final(sender) == KVPoll.DONE
    for layer in range(L):
        assert raw(dst_k[layer][dst_table]) == raw(src_k[layer][idx])
        assert raw(dst_v[layer][dst_table]) == raw(src_v[layer][idx])
        untouched = [b for b in range(10) if b not in dst_table]
        assert dst_k[layer][untouched].eq(0).all() and dst_v[layer][untouched].eq(0).all()
    sender.close()
    receiver.close()
    assert sender.join(5) and not sender_threads()


def test_partial_range_leaves_the_cached_prefix_alone(channel):
    # the decode worker already holds the request's first 2 blocks (prefix cache): only blocks 2.. are sent
    src_k, src_v = caches(8, torch.float32)
    for c in src_k + src_v:
        c.copy_(torch.randn(c.shape))
    src_table, dst_table, first = [4, 1, 6, 0, 3], [7, 2, 5, 0, 1], 2
    dst_k, dst_v = caches(8, torch.float32, fill=-1.0)
    prefix_before = [raw(c[dst_table[:first]]) for c in dst_k + dst_v]
    spec = spec_for("partial", len(src_table) - first, dtype="float32", first_block_index=first)
    receiver = create_receiver("local", spec, dst_k, dst_v, dst_table[first:], channel=channel)
    sender = create_sender("local", spec, channel=channel)
    idx = torch.tensor(src_table[first:])
    for layer in range(L):
        sender.send_layer(layer, src_k[layer][idx], src_v[layer][idx])
    sender.finish(5)
    assert wait_final(receiver) == KVPoll.DONE
    for layer in range(L):
        assert raw(dst_k[layer][dst_table[first:]]) == raw(src_k[layer][idx])
        assert raw(dst_v[layer][dst_table[first:]]) == raw(src_v[layer][idx])
    assert [raw(c[dst_table[:first]]) for c in dst_k + dst_v] == prefix_before
    sender.close()
    receiver.close()


def test_kv_head_slices_from_two_senders_fill_one_cache(channel):
    # prefill TP=2 -> decode TP=1: each prefill rank sends its 2 heads of 4 into the same blocks
    full_k = [torch.randn(3, BS, 4, D) for _ in range(L)]
    full_v = [torch.randn(3, BS, 4, D) for _ in range(L)]
    dst_k = [torch.zeros(5, BS, 4, D) for _ in range(L)]
    dst_v = [torch.zeros(5, BS, 4, D) for _ in range(L)]
    dst = [4, 0, 2]
    pairs = []
    for rank in range(2):
        spec = spec_for(f"tp/{rank}", 3, dtype="float32", kv_head_start=2 * rank)
        receiver = create_receiver("local", spec, dst_k, dst_v, dst, channel=channel)
        sender = create_sender("local", spec, channel=channel)
        for layer in range(L):
            heads = slice(2 * rank, 2 * rank + 2)
            sender.send_layer(layer, full_k[layer][:, :, heads], full_v[layer][:, :, heads])
        sender.finish(3)
        pairs.append((sender, receiver))
    assert all(wait_final(r) == KVPoll.DONE for _, r in pairs)
    for layer in range(L):
        assert torch.equal(dst_k[layer][dst], full_k[layer]) and torch.equal(dst_v[layer][dst], full_v[layer])
    for s, r in pairs:
        s.close()
        r.close()


def test_send_layer_blocks_gathers_blocks_and_heads_from_the_cache(channel):
    # prefill TP=1 -> decode rank 1 of TP=2: heads 2..3 of the prefill's 4, into a 2-head cache
    src_k = [torch.randn(9, BS, 4, D) for _ in range(L)]
    src_v = [torch.randn(9, BS, 4, D) for _ in range(L)]
    src_blocks = [8, 3, 5]
    dst_k = [torch.zeros(6, BS, 2, D) for _ in range(L)]
    dst_v = [torch.zeros(6, BS, 2, D) for _ in range(L)]
    spec = spec_for("blocks", 3, dtype="float32")
    receiver = create_receiver("local", spec, dst_k, dst_v, [1, 4, 0], channel=channel)
    sender = create_sender("local", spec, channel=channel)
    for layer in range(L):
        sender.send_layer_blocks(layer, src_k[layer], src_v[layer], torch.tensor(src_blocks), head_start=2)
    sender.finish(8)
    assert wait_final(receiver) == KVPoll.DONE
    for layer in range(L):
        assert torch.equal(dst_k[layer][[1, 4, 0]], src_k[layer][src_blocks][:, :, 2:4])
        assert torch.equal(dst_v[layer][[1, 4, 0]], src_v[layer][src_blocks][:, :, 2:4])
    bad = create_sender("local", spec_for("bad", 3, dtype="float32"), channel=channel)
    with pytest.raises(ValueError):
        bad.send_layer_blocks(0, src_k[0], src_v[0], src_blocks, head_start=3)  # heads 3..4 of 4: no such
    bad.close()
    sender.close()
    receiver.close()


def test_lease_expiry_fails_the_receiver(channel):
    spec = spec_for("slow", 2, lease_seconds=0.15)
    k, v = caches(4)
    receiver = create_receiver("local", spec, k, v, [0, 1], channel=channel)
    sender = create_sender("local", spec, channel=channel)
    sender.send_layer(0, torch.ones(spec.page_shape).bfloat16(), torch.ones(spec.page_shape).bfloat16())
    assert wait_final(receiver, timeout=2.0) == KVPoll.FAILED  # layers 1.. never come
    assert "lease" in receiver.error
    # the sender finds the receiver gone on its next message; its own lease also bounds it
    sender.send_layer(1, torch.ones(spec.page_shape).bfloat16(), torch.ones(spec.page_shape).bfloat16())
    assert wait_final(sender, timeout=2.0) == KVPoll.FAILED
    sender.close()
    receiver.close()
    assert sender.join(5) and not sender_threads()


def test_sender_without_finish_fails_by_its_lease(channel):
    spec = spec_for("no-finish", 2, lease_seconds=0.1)
    k, v = caches(4)
    receiver = create_receiver("local", spec, k, v, [0, 1], channel=channel)
    sender = create_sender("local", spec, channel=channel)
    sender.send_layer(0, torch.ones(spec.page_shape).bfloat16(), torch.ones(spec.page_shape).bfloat16())
    assert wait_final(sender, timeout=2.0) == KVPoll.FAILED and "lease" in sender.error
    sender.close()
    receiver.close()


def test_no_receiver_fails_the_sender(channel):
    spec = spec_for("nobody", 2)
    sender = create_sender("local", spec, channel=channel)
    sender.send_layer(0, torch.ones(spec.page_shape).bfloat16(), torch.ones(spec.page_shape).bfloat16())
    assert wait_final(sender) == KVPoll.FAILED and "no receiver" in sender.error
    sender.close()


def test_aborted_receiver_never_writes_again(channel):
    spec = spec_for("abort-recv", 2)
    k, v = caches(4)
    receiver = create_receiver("local", spec, k, v, [0, 1], channel=channel)
    receiver.abort()
    assert receiver.poll() == KVPoll.FAILED
    sender = create_sender("local", spec, channel=channel)
    for layer in range(L):
        sender.send_layer(layer, torch.ones(spec.page_shape).bfloat16(), torch.ones(spec.page_shape).bfloat16())
    sender.finish(1)
    assert wait_final(sender) == KVPoll.FAILED
    assert all(c.eq(0).all() for c in k + v)
    sender.close()
    receiver.close()


def test_sender_abort_fails_the_receiver_at_once(channel):
    spec = spec_for("abort-send", 2)
    k, v = caches(4)
    receiver = create_receiver("local", spec, k, v, [0, 1], channel=channel)
    sender = create_sender("local", spec, channel=channel)
    sender.send_layer(0, torch.ones(spec.page_shape).bfloat16(), torch.ones(spec.page_shape).bfloat16())
    sender.abort()
    assert sender.poll() == KVPoll.FAILED
    assert wait_final(receiver) == KVPoll.FAILED and "aborted" in receiver.error
    sender.close()
    receiver.close()
    assert sender.join(5) and not sender_threads()


def test_sender_rejects_misuse():
    spec = spec_for("misuse", 2)
    sender = create_sender("local", spec, channel=LocalChannel())
    with pytest.raises(ValueError):
        sender.send_layer(0, torch.ones(3, BS, H, D).bfloat16(), torch.ones(3, BS, H, D).bfloat16())
    with pytest.raises(ValueError):
        sender.send_layer(L, torch.ones(spec.page_shape).bfloat16(), torch.ones(spec.page_shape).bfloat16())
    with pytest.raises(ValueError, match="transport"):
        create_sender("carrier-pigeon", spec)
    sender.close()
