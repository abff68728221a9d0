"""One layer's KV pages as raw bytes and back, plus the checksums every transport uses.

Wire layout of a layer (`pack_layer`): the K pages then the V pages, each C-contiguous
[num_blocks, block_size, num_kv_heads, head_dim] in the spec's dtype, reinterpreted as uint8 (bf16
travels as its raw 16-bit pattern). No header inside: the spec says the shapes, and every message
carries `spec_fingerprint(spec)` so a sender and receiver that disagree fail instead of mis-writing.

The packed layer is a flat uint8 *tensor*, not `bytes`: on GPU a Triton pack kernel can produce it in
device memory and the dist transport sends it as is; `as_bytes` gives the zero-copy bytes view where a
transport needs one (gRPC, checksums). `pack_layer`/`unpack_layer`/`scatter_layer` are the function
boundary a fused kernel replaces.

`checksum` is a 64-bit position-weighted sum: the payload as little-endian 64-bit words w_i,
sum((2i+1) * w_i) + nbytes * K mod 2^64 — one torch.dot, ~10 GB/s here and GIL-free. It catches every
change confined to one word (the weights are odd, so invertible mod 2^64), reordered words and a wrong
length, and a random multi-word corruption with probability 1 - 2^-64; it is not meant to stop
tampering. Why not zlib.crc32: measured here it runs at 2-3.6 GB/s, and a transfer is checksummed
twice (sender, receiver), which alone took longer than moving the bytes over gloo.
A transfer's checksum (`TransferDigest`) is a blake2b over the (layer, offset, size, checksum) of every
data message in layer/offset order, so it also catches a missing or repeated message.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import zlib

import numpy as np
import torch

from cluster.transfer.base import TransferSpec


def pack_layer(k_pages: torch.Tensor, v_pages: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """K then V as one flat uint8 tensor: a copy, on the pages' device, into `out` when given
    (a pooled buffer, see buffers.py)."""
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k and v pages differ: {tuple(k_pages.shape)} {k_pages.dtype} vs "
                         f"{tuple(v_pages.shape)} {v_pages.dtype}")
    n = k_pages.numel() * k_pages.element_size()
    if out is None:
        out = torch.empty(2 * n, dtype=torch.uint8, device=k_pages.device)
    elif out.dtype != torch.uint8 or out.numel() != 2 * n or out.device != k_pages.device:
        raise ValueError(f"out must be {2 * n} uint8 bytes on {k_pages.device}")
    # Copy through typed views of the output so a non-contiguous slice (a KV-head slice) packs in one pass.
    out[:n].view(k_pages.dtype).view(k_pages.shape).copy_(k_pages)
    out[n:].view(v_pages.dtype).view(v_pages.shape).copy_(v_pages)
    return out


def pack_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, head_start: int,
                num_heads: int, out: torch.Tensor) -> torch.Tensor:
    """Gather blocks `block_ids`, heads [head_start, +num_heads) of one layer's caches straight into a packed
    buffer: the same bytes as pack_layer(k_cache[ids][:, :, heads], ...) with one copy instead of two."""
    shape = (block_ids.numel(), k_cache.shape[1], num_heads, k_cache.shape[3])
    n = out.numel() // 2
    heads = slice(head_start, head_start + num_heads)
    for cache, half in ((k_cache, out[:n]), (v_cache, out[n:])):
        src = cache if heads == slice(0, cache.shape[2]) else cache[:, :, heads]
        torch.index_select(src, 0, block_ids, out=half.view(cache.dtype).view(shape))
    return out


def unpack_layer(payload: torch.Tensor, spec: TransferSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (no copy) of K and V pages in a packed layer."""
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != spec.layer_nbytes:
        raise ValueError(f"payload must be {spec.layer_nbytes} uint8 bytes, got {payload.numel()} {payload.dtype}")
    half = spec.layer_nbytes // 2
    k = payload[:half].view(spec.torch_dtype).view(spec.page_shape)
    v = payload[half:].view(spec.torch_dtype).view(spec.page_shape)
    return k, v


def scatter_layer(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    dest_block_ids: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    kv_head_start: int = 0,
) -> None:
    """Write pages [nb, bs, h, D] into blocks dest_block_ids, heads [kv_head_start, +h) of the caches."""
    heads = slice(kv_head_start, kv_head_start + k_pages.shape[2])
    for cache, pages in ((k_cache, k_pages), (v_cache, v_pages)):
        pages = pages.to(cache.device, non_blocking=False)
        target = cache if heads == slice(0, cache.shape[2]) else cache[:, :, heads]
        target.index_copy_(0, dest_block_ids, pages)  # in place, also through the head-slice view


def as_bytes(data: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a contiguous CPU uint8 tensor."""
    return memoryview(data.numpy()).cast("B")


_MASK = (1 << 64) - 1
_LENGTH_MIX = 0x9E3779B97F4A7C15  # any odd constant: makes the length count
_weights = torch.empty(0, dtype=torch.int64)
_weights_lock = threading.Lock()


def _odd_weights(n: int) -> torch.Tensor:
    """1, 3, 5, ... (2n-1), cached and grown on demand (one layer's worth in steady state)."""
    global _weights
    with _weights_lock:
        if _weights.numel() < n:
            _weights = torch.arange(n, dtype=torch.int64).mul_(2).add_(1)
        return _weights[:n]


def checksum(data: bytes | bytearray | memoryview | torch.Tensor) -> int:
    """The 64-bit checksum of a payload (see the module docstring); an int in [0, 2^64)."""
    if isinstance(data, torch.Tensor):
        u8 = data.detach().cpu().contiguous().view(-1).view(torch.uint8)
        if u8.storage_offset() % 8:
            u8 = u8.clone()  # int64 views need 8-byte alignment
        nbytes = u8.numel()
        words = nbytes // 8
        total = int(torch.dot(u8[: words * 8].view(torch.int64), _odd_weights(words))) if words else 0
        return _finish(total, u8[words * 8:].numpy().tobytes(), words, nbytes)
    # Received protobuf bytes are read-only: numpy views them without a copy (torch would warn).
    # np.dot holds the GIL, unlike torch.dot; it wraps mod 2^64 the same way, so the values agree.
    u8 = np.frombuffer(data, dtype=np.uint8)
    nbytes = u8.size
    words = nbytes // 8
    weights = _odd_weights(words).numpy().view(np.uint64)
    total = int(np.dot(u8[: words * 8].view(np.uint64), weights)) if words else 0
    return _finish(total, u8[words * 8:].tobytes(), words, nbytes)


def _finish(total: int, tail: bytes, words: int, nbytes: int) -> int:
    if tail:  # the last partial word, zero-padded, weighted like the next word
        total += int.from_bytes(tail, "little") * (2 * words + 1)
    return (total + nbytes * _LENGTH_MIX) & _MASK


def spec_fingerprint(spec: TransferSpec) -> int:
    """crc32 of everything in the spec that fixes the bytes' meaning (not the lease)."""
    fields = (spec.transfer_id, spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim, spec.dtype,
              spec.num_blocks, spec.first_block_index, spec.kv_head_start, spec.kv_head_end)
    return zlib.crc32("|".join(map(str, fields)).encode())


class TransferDigest:
    """The whole-transfer checksum both sides build from the data messages they sent / accepted."""

    _RECORD = struct.Struct("<IQQQ")  # layer, offset, nbytes, checksum

    def __init__(self) -> None:
        self._records: list[tuple[int, int, int, int]] = []

    def add(self, layer_idx: int, offset: int, nbytes: int, checksum: int) -> None:
        self._records.append((layer_idx, offset, nbytes, checksum))

    def value(self) -> int:
        """64-bit, like `checksum`."""
        records = b"".join(self._RECORD.pack(*r) for r in sorted(self._records))
        return int.from_bytes(hashlib.blake2b(records, digest_size=8).digest(), "little")
