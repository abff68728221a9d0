"""Reusable host buffers for packed layers: the transports' answer to page-fault cost.

A packed layer is a few MiB. A fresh allocation of that size comes from mmap, so its first write
page-faults on every 4 KiB page: measured here, packing a 4 MiB layer into a new buffer took ~4 ms
against ~0.5 ms into a reused one — more than the whole network transfer of that layer. So senders
pack into, and receivers receive into, buffers taken from this pool and given back once the bytes
have been shipped or scattered into the cache.

Only CPU buffers are pooled (CUDA's caching allocator already reuses device memory). The pool keeps
at most `max_bytes`; a buffer given back beyond that is simply freed. A buffer is given back only
after its last use: on any error path it is dropped instead, so a transfer still in flight can never
see its bytes reused.
"""

from __future__ import annotations

import threading

import torch

DEFAULT_MAX_BYTES = 256 << 20


class BufferPool:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._free: dict[int, list[torch.Tensor]] = {}
        self._bytes = 0

    def acquire(self, nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A flat uint8 tensor of nbytes (contents undefined)."""
        if torch.device(device).type == "cpu":
            with self._lock:
                free = self._free.get(nbytes)
                if free:
                    self._bytes -= nbytes
                    return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def release(self, buf: torch.Tensor) -> None:
        """Give a buffer back; the caller must not touch it afterwards."""
        if buf.device.type != "cpu" or buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
            return
        if buf.storage_offset() != 0 or buf.untyped_storage().nbytes() != buf.numel():
            return  # a view into something bigger: not ours to recycle
        nbytes = buf.numel()
        with self._lock:
            if self._bytes + nbytes <= self.max_bytes:
                self._free.setdefault(nbytes, []).append(buf)
                self._bytes += nbytes

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._bytes = 0


POOL = BufferPool()
