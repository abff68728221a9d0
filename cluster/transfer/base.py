"""The KV-transfer seams: what the engine calls on each side of a disaggregated request.

Prefill side: a `KVSender` per (request, decode rank). After each layer's forward the engine hands it
that layer's pages for the blocks being sent (`send_layer`, non-blocking: the pages are packed and
queued, a background thread ships them while the next layer computes), then `finish(first_token)`
once the first token is sampled. `poll()` says when the pages have left (the prefill worker may then
free its blocks) or that the transfer failed.

Decode side: a `KVReceiver` per (request, decode rank), made when the blocks are reserved, before the
prefill starts. It writes every layer that arrives straight into the reserved blocks of the decode
worker's own caches. The engine polls it each step: DONE moves the request from WAITING_FOR_KV to
running with `first_token_id` as its first output; FAILED (checksum mismatch, sender gone, lease
expired) makes the decode worker prefill the prompt itself.

With tensor parallelism every rank has its own sender/receiver; ranks agree on one state by taking
the minimum (`combine`): the request is DONE only when every rank's slice is.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

import torch


class KVPoll(IntEnum):
    """Ordered so that the minimum over TP ranks is the state of the whole request."""

    FAILED = 0
    WAITING = 1  # nothing moved yet
    TRANSFERRING = 2
    DONE = 3


def combine(polls: Iterable[KVPoll]) -> KVPoll:
    """The state of a transfer split over ranks: the least advanced (FAILED beats everything)."""
    return KVPoll(min(polls))


class TransferError(RuntimeError):
    """A transfer cannot go on (bad spec, checksum mismatch, peer gone); the transfer is FAILED."""


@dataclass(frozen=True)
class TransferSpec:
    """What one transfer carries. Sender and receiver build it from the same request and must agree
    (every message carries a fingerprint of it, see codec.spec_fingerprint).

    The pages sent for layer l are [num_blocks, block_size, num_kv_heads, head_dim]: blocks
    first_block_index.. of the request's block table, in logical order, landing in KV heads
    [kv_head_start, kv_head_end) of the receiver's cache. Those are the receiver's local heads; the
    sender picks its own with send_layer_blocks(head_start=...) or narrows the pages it passes to
    send_layer (cluster/parallel/heads.py says which slice goes where when the TP sizes differ).
    """

    transfer_id: str
    num_layers: int
    block_size: int
    num_kv_heads: int  # of the slice being sent
    head_dim: int
    dtype: str  # torch dtype name: "float32", "bfloat16", "float16"
    num_blocks: int  # blocks being sent
    first_block_index: int = 0  # within the request's block table: the decode side holds the ones before
    kv_head_start: int = 0  # where the slice goes in the receiver's cache heads
    kv_head_end: int | None = None  # None: kv_head_start + num_kv_heads
    lease_seconds: float = 30.0

    def __post_init__(self) -> None:
        if not self.transfer_id:
            raise ValueError("transfer_id must be non-empty")
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "num_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.first_block_index < 0 or self.kv_head_start < 0:
            raise ValueError("first_block_index and kv_head_start must be >= 0")
        if self.kv_head_end is None:
            object.__setattr__(self, "kv_head_end", self.kv_head_start + self.num_kv_heads)
        if self.kv_head_end - self.kv_head_start != self.num_kv_heads:
            raise ValueError(f"kv_head_end - kv_head_start must equal num_kv_heads ({self.num_kv_heads}), "
                             f"got [{self.kv_head_start}, {self.kv_head_end})")
        if self.lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {self.lease_seconds}")
        torch_dtype(self.dtype)  # raises on an unknown name

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        return (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def layer_nbytes(self) -> int:
        """Packed size of one layer: K and V pages."""
        n = self.num_blocks * self.block_size * self.num_kv_heads * self.head_dim
        return 2 * n * self.torch_dtype.itemsize

    @property
    def total_nbytes(self) -> int:
        return self.num_layers * self.layer_nbytes


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class KVSender(abc.ABC):
    """Prefill side of one transfer. Thread-safe for one caller (the engine's step loop)."""

    spec: TransferSpec

    @abc.abstractmethod
    def send_layer(self, layer_idx: int, k_pages: torch.Tensor, v_pages: torch.Tensor) -> None:
        """Queue layer `layer_idx`'s pages ([num_blocks, block_size, num_kv_heads, head_dim] each).
        Copies them before returning, so the caller may overwrite or free the source blocks."""

    def send_layer_blocks(self, layer_idx: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_ids: torch.Tensor | list[int], head_start: int = 0) -> None:
        """Like send_layer, reading blocks `block_ids` (the request's blocks first_block_index.., in
        order), KV heads [head_start, +spec.num_kv_heads) of one layer's whole caches. Transports
        override it to gather straight into their send buffer (one copy, not two)."""
        ids = torch.as_tensor(block_ids, dtype=torch.int64, device=k_cache.device)
        heads = slice(head_start, head_start + self.spec.num_kv_heads)
        self.send_layer(layer_idx, k_cache[ids][:, :, heads], v_cache[ids][:, :, heads])

    @abc.abstractmethod
    def finish(self, first_token_id: int) -> None:
        """Queue the final message: the first token and the checksum over everything sent."""

    @abc.abstractmethod
    def poll(self) -> KVPoll:
        """DONE once everything, final message included, has been handed to the receiver."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Stop sending; tell the receiver (where the transport can) so it fails now."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the background thread and per-transfer resources (idempotent)."""

    def __enter__(self) -> KVSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KVReceiver(abc.ABC):
    """Decode side of one transfer; writes into `dest_block_ids` of the given caches."""

    spec: TransferSpec

    @abc.abstractmethod
    def poll(self) -> KVPoll:
        """DONE only when every layer arrived and every checksum matched; FAILED on a mismatch, the
        sender gone, or the lease expired. Once FAILED it never writes into the caches again."""

    def wait(self, timeout_s: float) -> KVPoll:
        """Block until DONE or FAILED, or until timeout_s passed; the state then. The engine polls
        from its step loop instead; this is for callers with nothing else to do (benchmarks, tools)."""
        deadline = time.monotonic() + timeout_s
        while (state := self.poll()) in (KVPoll.WAITING, KVPoll.TRANSFERRING) and time.monotonic() < deadline:
            time.sleep(0.001)
        return state

    @property
    @abc.abstractmethod
    def first_token_id(self) -> int:
        """The token the prefill worker sampled; valid once poll() is DONE."""

    @property
    def nbytes(self) -> int:
        """KV page bytes this receiver takes in when the transfer completes."""
        return self.spec.total_nbytes

    @abc.abstractmethod
    def abort(self) -> None:
        """Give up: FAILED, and no later message writes into the caches."""

    @abc.abstractmethod
    def close(self) -> None:
        """Unregister and release resources (idempotent). Implies abort() unless DONE."""

    def __enter__(self) -> KVReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
