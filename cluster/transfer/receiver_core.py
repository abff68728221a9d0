"""The receiving half every transport shares: validate each message, write it into the cache, decide.

A transport only decodes its framing and calls `on_data` / `on_final` / `on_abort` / `fail` from its
own thread; the engine calls `poll` from its step loop. Every write into the caches happens under the
lock after checking the state, so once `poll()` has returned FAILED (or `abort()` returned) no late
message can touch blocks the decode worker may already have handed to another request.

Data for a layer may come in one message (local) or in consecutive chunks (dist, gRPC). A tensor that
holds whole blocks (a layer, or a dist chunk: whole blocks of K or of V) is scattered straight from
it, the moment it arrives; other chunks (and protobuf's read-only bytes) are assembled in a staging
buffer first, because their boundaries can fall anywhere inside a page, and scattered once the layer
is complete.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from cluster.transfer import host_copy
from cluster.transfer.base import KVPoll, TransferSpec
from cluster.transfer.buffers import POOL
from cluster.transfer.codec import (
    ROW_BYTES,
    TransferDigest,
    checksum,
    scatter_range,
    spec_fingerprint,
)


def check_destination(spec: TransferSpec, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                      dest_block_ids: list[int]) -> None:
    """Raise ValueError when the caches or blocks cannot hold what the spec describes."""
    if len(k_caches) != spec.num_layers or len(v_caches) != spec.num_layers:
        raise ValueError(f"need {spec.num_layers} k/v caches, got {len(k_caches)}/{len(v_caches)}")
    if len(dest_block_ids) != spec.num_blocks:
        raise ValueError(f"need {spec.num_blocks} destination blocks, got {len(dest_block_ids)}")
    if len(set(dest_block_ids)) != len(dest_block_ids):
        raise ValueError("destination blocks must be distinct")
    for cache in (*k_caches, *v_caches):
        nblocks, block_size, heads, head_dim = cache.shape
        if (block_size, head_dim) != (spec.block_size, spec.head_dim) or cache.dtype != spec.torch_dtype:
            raise ValueError(f"cache {tuple(cache.shape)} {cache.dtype} does not match the spec "
                             f"(block_size={spec.block_size}, head_dim={spec.head_dim}, {spec.dtype})")
        if spec.kv_head_end > heads:
            raise ValueError(f"kv heads [{spec.kv_head_start}, {spec.kv_head_end}) exceed the cache's {heads}")
        if not all(0 <= b < nblocks for b in dest_block_ids):
            raise ValueError(f"destination block ids must be in [0, {nblocks})")


class ReceiverCore:
    def __init__(
        self,
        spec: TransferSpec,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        dest_block_ids: list[int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_destination(spec, k_caches, v_caches, dest_block_ids)
        self.spec = spec
        self.fingerprint = spec_fingerprint(spec)
        self._k_caches, self._v_caches = k_caches, v_caches
        self._dest = torch.tensor(dest_block_ids, dtype=torch.int64, device=k_caches[0].device)
        self._clock = clock
        self.deadline = clock() + spec.lease_seconds
        self._lock = threading.Lock()
        self._state = KVPoll.WAITING
        self.error: str | None = None
        self._received = [0] * spec.num_layers  # bytes of each layer accepted so far
        self._staging: dict[int, tuple[int, torch.Tensor]] = {}  # layer -> (first staged offset, buffer)
        self._block_bytes = spec.layer_nbytes // 2 // spec.num_blocks
        self._digest = TransferDigest()
        self._first_token_id: int | None = None
        self._finished = threading.Event()  # set on DONE or FAILED: `wait` blocks on it instead of polling
        self._rows: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None  # see _layer_rows
        self.bytes_received = 0

    # -- called by the transport ------------------------------------------------------------------

    def on_data(self, layer_idx: int, offset: int, data: bytes | memoryview | torch.Tensor, data_checksum: int,
                fingerprint: int) -> bool:
        """Accept one data message; False when the transfer is (now) over and the sender should stop."""
        fused = self._can_scatter_checksummed(layer_idx, offset, data)
        # Outside the lock: the expensive part, and pure. The fused path checks while it writes, under the lock.
        intact = fused or checksum(data) == data_checksum
        with self._lock:
            if not self._live_locked():
                return False
            reason = self._check_data_locked(layer_idx, offset, len(data), intact, fingerprint)
            if reason:
                self._fail_locked(reason)
                return False
            if fused:
                if self._scatter_checksummed(layer_idx, offset, data) != data_checksum:
                    # the pages landed in this transfer's own blocks, which nothing reads unless it is DONE
                    self._fail_locked(f"checksum mismatch in layer {layer_idx} at offset {offset}")
                    return False
                self._received[layer_idx] += len(data)
                self.bytes_received += len(data)
            else:
                self._write_locked(layer_idx, offset, data)
            self._digest.add(layer_idx, offset, len(data), data_checksum)
            self._state = KVPoll.TRANSFERRING
            return True

    def on_final(self, first_token_id: int, num_layers: int, digest: int, fingerprint: int) -> bool:
        with self._lock:
            if not self._live_locked():
                return False
            missing = [i for i, n in enumerate(self._received) if n != self.spec.layer_nbytes]
            if fingerprint != self.fingerprint:
                self._fail_locked("final message: spec fingerprint mismatch")
            elif num_layers != self.spec.num_layers or missing:
                self._fail_locked(f"final message before layers {missing} arrived (sender says {num_layers})")
            elif digest != self._digest.value():
                self._fail_locked("transfer checksum mismatch")
            else:
                self._first_token_id = first_token_id
                self._state = KVPoll.DONE
                self._finished.set()
            return self._state == KVPoll.DONE

    def on_abort(self, reason: str) -> None:
        self.fail(f"sender aborted: {reason}" if reason else "sender aborted")

    def fail(self, reason: str) -> None:
        with self._lock:
            if self._state != KVPoll.DONE:
                self._fail_locked(reason)

    # -- called by the engine (through the transport's KVReceiver) --------------------------------

    def poll(self) -> KVPoll:
        with self._lock:
            self._live_locked()  # applies the lease
            return self._state

    def wait(self, timeout_s: float) -> KVPoll:
        """Block until DONE or FAILED (the lease included) or timeout_s passed; the state then."""
        deadline = time.monotonic() + timeout_s
        while (state := self.poll()) in (KVPoll.WAITING, KVPoll.TRANSFERRING):
            now = time.monotonic()
            if now >= deadline:
                break
            # The lease expires without any message arriving, so wake for it too (poll applies it).
            lease_left = self.deadline - self._clock()
            self._finished.wait(max(min(deadline - now, lease_left), 1e-4))
        return state

    @property
    def first_token_id(self) -> int:
        if self._first_token_id is None:
            raise RuntimeError(f"transfer {self.spec.transfer_id} is not DONE ({self.poll().name})")
        return self._first_token_id

    @property
    def finished(self) -> bool:
        """DONE or FAILED: nothing more will be written."""
        return self.poll() in (KVPoll.DONE, KVPoll.FAILED)

    # -- internals (lock held) ----------------------------------------------------------------------

    def _live_locked(self) -> bool:
        if self._state in (KVPoll.WAITING, KVPoll.TRANSFERRING) and self._clock() > self.deadline:
            self._fail_locked(f"lease of {self.spec.lease_seconds:g}s expired")
        return self._state in (KVPoll.WAITING, KVPoll.TRANSFERRING)

    def _fail_locked(self, reason: str) -> None:
        if self._state != KVPoll.FAILED:
            self._state = KVPoll.FAILED
            self.error = reason
            self._finished.set()
            for _, staging in self._staging.values():
                POOL.release(staging)
            self._staging.clear()

    def _check_data_locked(self, layer: int, offset: int, nbytes: int, intact: bool, fingerprint: int) -> str | None:
        if fingerprint != self.fingerprint:
            return "spec fingerprint mismatch: sender and receiver disagree on the transfer's shape"
        if not 0 <= layer < self.spec.num_layers:
            return f"layer {layer} out of range [0, {self.spec.num_layers})"
        if offset != self._received[layer]:
            return f"layer {layer}: got bytes at offset {offset}, expected {self._received[layer]}"
        if offset + nbytes > self.spec.layer_nbytes:
            return f"layer {layer}: {offset + nbytes} bytes exceed the layer's {self.spec.layer_nbytes}"
        if not intact:
            return f"checksum mismatch in layer {layer} at offset {offset}"
        return None

    def _write_locked(self, layer: int, offset: int, data: bytes | memoryview | torch.Tensor) -> None:
        nbytes = len(data)
        staged = self._staging.get(layer)
        if (staged is None and isinstance(data, torch.Tensor) and offset % self._block_bytes == 0
                and nbytes % self._block_bytes == 0):
            self._scatter(layer, offset, data)  # whole blocks: straight from the message
        else:  # read-only bytes torch cannot view without a warning, or a cut inside a page: one copy
            if staged is None:
                staged = self._staging[layer] = (offset, POOL.acquire(self.spec.layer_nbytes))
            staging = staged[1]
            if isinstance(data, torch.Tensor):
                staging[offset:offset + nbytes].copy_(data)
            else:  # numpy copies from a read-only buffer without a torch warning or an extra copy
                staging.numpy()[offset:offset + nbytes] = np.frombuffer(data, dtype=np.uint8)
        self._received[layer] += nbytes
        self.bytes_received += nbytes
        if self._received[layer] == self.spec.layer_nbytes and staged is not None:
            start, staging = self._staging.pop(layer)  # everything from `start` on came through staging
            self._scatter(layer, start, staging[start:])
            POOL.release(staging)

    def _scatter(self, layer: int, offset: int, data: torch.Tensor) -> None:
        scatter_range(self._k_caches[layer], self._v_caches[layer], self._dest, data, offset, self.spec)

    def _can_scatter_checksummed(self, layer: int, offset: int, data: bytes | memoryview | torch.Tensor) -> bool:
        """Whether this message's whole host blocks can be scattered and checksummed in one pass."""
        if not (isinstance(data, torch.Tensor) and data.device.type == "cpu" and data.dtype == torch.uint8
                and data.dim() == 1 and data.is_contiguous() and data.data_ptr() % 8 == 0):
            return False
        if not 0 <= layer < self.spec.num_layers or layer in self._staging:
            return False
        nbytes = data.numel()
        if offset % self._block_bytes or nbytes % self._block_bytes or offset + nbytes > self.spec.layer_nbytes:
            return False
        return self._layer_rows(layer) is not None

    def _layer_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's K and V caches as [N, block_bytes] bytes (host_copy.block_rows), or None."""
        if self._rows is None:
            whole = self.spec.kv_head_start == 0 and self.spec.num_kv_heads == self._k_caches[0].shape[2]
            pairs = [(host_copy.block_rows(k), host_copy.block_rows(v)) if whole else (None, None)
                     for k, v in zip(self._k_caches, self._v_caches, strict=True)]
            self._rows = [None if k is None or v is None else (k, v) for k, v in pairs]
        return self._rows[layer]

    def _scatter_checksummed(self, layer: int, offset: int, data: torch.Tensor) -> int:
        """Write whole blocks of a packed layer (as scatter_range does) and return the data's checksum."""
        rows = self._layer_rows(layer)
        half = self.spec.layer_nbytes // 2
        weighted, pos, end = 0, offset, offset + data.numel()
        while pos < end:
            in_half = pos % half
            take = min(end - pos, half - in_half)
            first, count = in_half // self._block_bytes, take // self._block_bytes
            weighted += host_copy.scatter_checksummed(data[pos - offset:pos - offset + take],
                                                      self._dest[first:first + count], rows[pos >= half],
                                                      (pos - offset) // ROW_BYTES)
            pos += take
        return host_copy.message_checksum(weighted, data.numel())
