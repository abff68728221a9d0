"""Gather and scatter of host KV blocks that checksum the bytes in the same pass (kernels/csrc/kv_block_copy.cpp).

On a CPU worker the dist transport's own work per byte is a gather into the message and a checksum on
the prefill side, a checksum and a scatter into the reserved blocks on the decode side. Done in torch
that is two passes per side; these do one, without the GIL. They return `codec.checksum` of the bytes
copied, so a message checked this way and one checked by `codec.checksum` agree bit for bit.

`block_rows(cache)` is the [num_blocks, block_bytes] byte view the kernels copy whole blocks through,
or None when the fused path does not apply (device memory, a layout whose blocks are not contiguous
bytes, blocks that are not whole 512-byte checksum rows, no C++ toolchain, or the kernels not loaded in
this process yet): callers then take the torch path, with the same result. Loading is explicit
(`available()`): the first load on a machine compiles for tens of seconds, which must never happen
inside a transfer's lease. The dist transport loads them when its endpoint or a sender is made; a CPU
worker has them already from loading its model (the same extension).

On the decode side the scatter writes a message's pages *before* its checksum is known. That is safe
because they land only in blocks reserved for this transfer, which join the prefix cache only once the
whole transfer is DONE; on a mismatch the transfer fails and those blocks are recomputed or freed.
"""

from __future__ import annotations

import torch

from cluster.transfer.codec import ROW_BYTES, finish_weighted
from kernels import cpu_decode


def available() -> bool:
    """Build or load the kernels now (tens of seconds the first time on a machine, then about a second
    per process); False without a compiler."""
    return cpu_decode.load() is not None


def block_rows(cache: torch.Tensor) -> torch.Tensor | None:
    """The cache [N, block_size, heads, head_dim] as [N, block_bytes] uint8, when the fused copy applies."""
    if cache.device.type != "cpu" or not cache.is_contiguous() or not cpu_decode.loaded():
        return None
    rows = cache.view(cache.shape[0], -1).view(torch.uint8)
    if rows.shape[1] % ROW_BYTES or rows.data_ptr() % 8:
        return None
    return rows


def gather_checksummed(blocks: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, first_row: int) -> int:
    """out = blocks[ids], flat; the weighted checksum part of `out` (rows numbered from first_row)."""
    return torch.ops.pdserve_cpu.gather_blocks_checksum(blocks, ids, out, first_row)


def scatter_checksummed(data: torch.Tensor, ids: torch.Tensor, blocks: torch.Tensor, first_row: int) -> int:
    """blocks[ids] = data viewed as whole blocks; the weighted checksum part of `data`."""
    return torch.ops.pdserve_cpu.scatter_blocks_checksum(data, ids, blocks, first_row)


def message_checksum(weighted_parts: int, nbytes: int) -> int:
    """`codec.checksum` of a whole-row message from the weighted parts of its pieces."""
    return finish_weighted(weighted_parts, nbytes)
