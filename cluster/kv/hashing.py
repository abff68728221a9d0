"""Content hashes of full KV blocks, chained so a block's hash stands for its whole prefix.

The hash must be identical in every process (prefill and decode workers, the router's prefix index),
so it is a hashlib digest over fixed-width little-endian token ids, never Python's salted `hash()`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# The first block of a sequence has no parent; a fixed root keeps "no parent" distinct from any digest.
_ROOT = b"pdserve-kv-root"
_DIGEST_SIZE = 16  # 128 bits: collisions are out of reach for any realistic cache size


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Hash one block's tokens together with the hash of the block before it."""
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    h.update(_ROOT if parent_hash is None else parent_hash)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def extend_block_hashes(block_hashes: list[bytes], token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Append to `block_hashes` the hashes of full blocks of `token_ids` it does not cover yet.

    Tokens only ever get appended to a sequence, so earlier hashes stay valid and each step hashes
    only the blocks that became full since the last call. Returns `block_hashes` for chaining.
    """
    num_full_blocks = len(token_ids) // block_size
    for i in range(len(block_hashes), num_full_blocks):
        parent = block_hashes[i - 1] if i > 0 else None
        block_hashes.append(hash_block_tokens(parent, token_ids[i * block_size:(i + 1) * block_size]))
    return block_hashes


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The chained hashes of the full blocks of `token_ids`: what a worker with this `block_size`
    registers in the prefix cache (and publishes to the cluster's prefix index) for these tokens, so a
    router can look a prompt up in that index before choosing a worker."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return extend_block_hashes([], token_ids, block_size)
