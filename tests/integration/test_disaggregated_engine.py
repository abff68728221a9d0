"""Prefill engine → KV transfer → decode engine gives the unified engine's greedy tokens.

Two engines in one process, joined by a transport: the decode engine reserves blocks (reusing its
prefix cache, so only the missing range is sent), the prefill engine computes the prompt and sends
each layer's pages as it is written, and the decode engine continues from the first token. Failure
paths (sender gone, lease expired) make the decode engine prefill locally: same tokens, no leaks.
"""

from __future__ import annotations

import itertools
import random

import pytest

from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.request import SamplingParams
from cluster.transfer import TransferSpec, create_receiver, create_sender

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
_ids = itertools.count()


def engine(model_dir) -> LLMEngine:
    return LLMEngine(str(model_dir), EngineConfig(dtype="float32", num_kv_blocks=256, max_num_batched_tokens=96))


def run(engine_: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine_.has_unfinished_requests():
        for out in engine_.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def unified_tokens(model_dir, prompts) -> list[list[int]]:
    e = engine(model_dir)
    for i, p in enumerate(prompts):
        e.add_request(f"u{i}", p, GREEDY)
    out = run(e)
    return [out[f"u{i}"] for i in range(len(prompts))]


def disaggregate(prefill: LLMEngine, decode: LLMEngine, prompts, *, lease_seconds=30.0, send=True):
    """Route each prompt P → D over the local transport; returns the request ids in order."""
    ids = []
    for prompt in prompts:
        rid = f"req-{next(_ids)}"
        reservation = decode.add_remote_kv_request(rid, prompt, GREEDY)
        assert reservation is not None
        spec = TransferSpec(
            transfer_id=rid, num_layers=decode.arch.num_layers, block_size=decode.config.block_size,
            num_kv_heads=decode.arch.num_kv_heads, head_dim=decode.arch.head_dim, dtype="float32",
            num_blocks=len(reservation.block_ids), first_block_index=reservation.first_block_index,
            kv_head_start=0, kv_head_end=decode.arch.num_kv_heads, lease_seconds=lease_seconds,
        )
        decode.attach_kv_receiver(
            rid, create_receiver("local", spec, decode.attn.k_caches, decode.attn.v_caches, reservation.block_ids)
        )
        if send:
            prefill.add_request(rid, prompt, GREEDY, kv_sender=create_sender("local", spec),
                                first_block_index=reservation.first_block_index)
        ids.append(rid)
    return ids


def prompts_for(vocab: int, lengths, seed: int, prefix=()) -> list[list[int]]:
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(8, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
def test_prefill_to_decode_equals_unified(preset, preset_model_dir):
    model_dir = preset_model_dir(preset)
    prefill, decode = engine(model_dir), engine(model_dir)
    vocab = prefill.arch.vocab_size
    prompts = prompts_for(vocab, [1, 15, 16, 17, 40, 130], seed=11)
    ids = disaggregate(prefill, decode, prompts)
    first = run(prefill)
    assert all(len(first[rid]) == 1 for rid in ids)  # the prefill worker samples the first token only
    got = run(decode)
    want = unified_tokens(model_dir, prompts)
    assert [got[rid] for rid in ids] == want
    assert [first[rid][0] for rid in ids] == [w[0] for w in want]
    assert decode.num_kv_transfer_fallbacks == 0
    # Every prompt block crossed (a fresh decode cache holds no prefix): K and V, every layer, fp32.
    arch, block_size = decode.arch, decode.config.block_size
    num_blocks = sum(-(-len(p) // block_size) for p in prompts)
    assert decode.num_kv_bytes_received == (num_blocks * block_size * arch.num_kv_heads * arch.head_dim * 4
                                            * 2 * arch.num_layers)
    prefill.kv_manager.check_no_leaks()
    decode.kv_manager.check_no_leaks()


def test_decode_prefix_hits_send_only_the_missing_range(tiny_model_dir):
    prefill, decode = engine(tiny_model_dir), engine(tiny_model_dir)
    shared = prompts_for(prefill.arch.vocab_size, [48], seed=12)[0]
    warm = prompts_for(prefill.arch.vocab_size, [5], seed=13, prefix=shared)
    decode.add_request("warm", warm[0], GREEDY)  # the decode worker computes the shared prefix itself
    run(decode)
    prompts = prompts_for(prefill.arch.vocab_size, [3, 20, 33], seed=14, prefix=shared)
    ids = disaggregate(prefill, decode, prompts)
    assert all(decode.scheduler.get_request(rid).num_cached_tokens == 48 for rid in ids)
    run(prefill)
    got = run(decode)
    assert [got[rid] for rid in ids] == unified_tokens(tiny_model_dir, prompts)
    prefill.kv_manager.check_no_leaks()
    decode.kv_manager.check_no_leaks()


def test_lost_sender_falls_back_to_local_prefill(tiny_model_dir):
    prefill, decode = engine(tiny_model_dir), engine(tiny_model_dir)
    prompts = prompts_for(prefill.arch.vocab_size, [10, 70], seed=15)
    ids = disaggregate(prefill, decode, prompts, lease_seconds=0.2, send=False)  # nothing is ever sent
    got = run(decode)
    assert [got[rid] for rid in ids] == unified_tokens(tiny_model_dir, prompts)
    assert decode.num_kv_transfer_fallbacks == 2
    decode.kv_manager.check_no_leaks()


class _FaultyChannel:
    """A LocalChannel stand-in that damages the wire: flips bytes of one layer (the checksum then
    disagrees) or goes silent after some layers (the sender died mid-transfer)."""

    def __init__(self, real, *, corrupt_layer: int | None = None, die_after_layers: int | None = None):
        self.real, self.corrupt_layer, self.die_after_layers = real, corrupt_layer, die_after_layers

    def register(self, core):
        self.real.register(core)

    def unregister(self, core):
        self.real.unregister(core)

    def lookup(self, transfer_id):
        core = self.real.lookup(transfer_id)
        return None if core is None else _FaultyCore(core, self)


class _FaultyCore:
    def __init__(self, core, faults: _FaultyChannel):
        self.core, self.faults = core, faults

    def on_data(self, layer_idx, offset, payload, crc, fingerprint):
        if self.faults.die_after_layers is not None and layer_idx >= self.faults.die_after_layers:
            return True  # swallowed: nothing more ever reaches the receiver
        if layer_idx == self.faults.corrupt_layer:
            payload = payload.clone()
            payload.view(-1)[:64] += 1  # bit rot on the wire, after the sender computed its checksum
        return self.core.on_data(layer_idx, offset, payload, crc, fingerprint)

    def on_final(self, *args):
        if self.faults.die_after_layers is not None:
            return True
        return self.core.on_final(*args)

    def on_abort(self, reason):
        self.core.on_abort(reason)


@pytest.mark.parametrize("fault", [{"corrupt_layer": 1}, {"die_after_layers": 2}])
def test_damaged_transfers_fall_back_with_the_same_tokens(tiny_model_dir, fault):
    from cluster.transfer.local import LocalChannel

    prefill, decode = engine(tiny_model_dir), engine(tiny_model_dir)
    prompts = prompts_for(prefill.arch.vocab_size, [24, 66], seed=16)
    channel = _FaultyChannel(LocalChannel(), **fault)
    ids = []
    for prompt in prompts:
        rid = f"fault-{next(_ids)}"
        reservation = decode.add_remote_kv_request(rid, prompt, GREEDY)
        spec = TransferSpec(
            transfer_id=rid, num_layers=decode.arch.num_layers, block_size=decode.config.block_size,
            num_kv_heads=decode.arch.num_kv_heads, head_dim=decode.arch.head_dim, dtype="float32",
            num_blocks=len(reservation.block_ids), first_block_index=reservation.first_block_index,
            lease_seconds=0.5,
        )
        decode.attach_kv_receiver(rid, create_receiver("local", spec, decode.attn.k_caches, decode.attn.v_caches,
                                                       reservation.block_ids, channel=channel))
        prefill.add_request(rid, prompt, GREEDY, kv_sender=create_sender("local", spec, channel=channel),
                            first_block_index=reservation.first_block_index)
        ids.append(rid)
    run(prefill)
    got = run(decode)
    assert [got[rid] for rid in ids] == unified_tokens(tiny_model_dir, prompts)
    assert decode.num_kv_transfer_fallbacks == len(prompts)
    prefill.kv_manager.check_no_leaks()
    decode.kv_manager.check_no_leaks()
