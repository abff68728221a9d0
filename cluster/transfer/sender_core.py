"""The sending half every transport shares: pack on the caller's thread, ship on a background one.

`send_layer` packs the pages (`send_layer_blocks` gathers them from the cache) into a pooled buffer —
one copy, so the prefill may reuse its blocks at once — and queues them; `finish` queues the final
message. A transport with its own wire layout packs through `_pack_pages` / `_pack_blocks`. A
background thread, started on the first message (or at construction, by a transport whose handshake
should overlap the first layer's compute), runs the transport's `_run(messages)`, which consumes
`messages` — an iterator that yields queued `LayerMsg`, then `FinalMsg`, or `AbortMsg` if `abort()`
was called — and ships each. Packing on the compute thread
and shipping on another is what overlaps layer l's transfer with layer l+1's compute.

The iterator also enforces the sender's own lease: a transfer whose `finish` never comes (a crashed
step) ends FAILED after `spec.lease_seconds` instead of holding a thread for ever. By then the
receiver, whose lease started earlier, has failed too.
"""

from __future__ import annotations

import abc
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from cluster.transfer.base import KVPoll, KVSender, TransferError, TransferSpec
from cluster.transfer.buffers import POOL
from cluster.transfer.codec import TransferDigest, checksum, pack_blocks, pack_layer, spec_fingerprint

log = logging.getLogger(__name__)


class LayerMsg:
    """One packed layer in a pooled buffer (codec.pack_layer's layout, unless the transport packs its own)."""

    def __init__(self, layer_idx: int, buffer: torch.Tensor) -> None:
        self.layer_idx = layer_idx
        self.buffer = buffer
        self.payload = buffer  # packed K+V, flat uint8


@dataclass
class FinalMsg:
    first_token_id: int


@dataclass
class AbortMsg:
    reason: str


Message = LayerMsg | FinalMsg | AbortMsg


class QueuedSender(KVSender):
    def __init__(self, spec: TransferSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.fingerprint = spec_fingerprint(spec)
        self.digest = TransferDigest()  # the transport records each data message it frames
        self._clock = clock
        self.deadline = clock() + spec.lease_seconds
        self._queue: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._state = KVPoll.WAITING
        self.error: str | None = None
        self._finished = self._aborted = self._closed = False
        self._layers_sent: set[int] = set()
        self._thread: threading.Thread | None = None
        self.bytes_sent = 0

    # -- KVSender ------------------------------------------------------------------------------------

    def send_layer(self, layer_idx: int, k_pages: torch.Tensor, v_pages: torch.Tensor) -> None:
        if self._aborted:
            return  # the transfer is over: nothing to pack
        self._check_layer(layer_idx)
        if tuple(k_pages.shape) != self.spec.page_shape or k_pages.dtype != self.spec.torch_dtype:
            raise ValueError(f"pages must be {self.spec.page_shape} {self.spec.dtype}, "
                             f"got {tuple(k_pages.shape)} {k_pages.dtype}")
        self._layers_sent.add(layer_idx)
        self._put(self._pack_pages(layer_idx, k_pages, v_pages))

    def send_layer_blocks(self, layer_idx: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_ids: torch.Tensor | list[int], head_start: int = 0) -> None:
        if self._aborted:
            return
        self._check_layer(layer_idx)
        ids = torch.as_tensor(block_ids, dtype=torch.int64, device=k_cache.device)
        spec = self.spec
        if (ids.numel() != spec.num_blocks or k_cache.dtype != spec.torch_dtype or k_cache.shape != v_cache.shape
                or (k_cache.shape[1], k_cache.shape[3]) != (spec.block_size, spec.head_dim)
                or not 0 <= head_start <= k_cache.shape[2] - spec.num_kv_heads):
            raise ValueError(f"cannot read {spec.num_blocks} blocks of {spec.page_shape[1:]} {spec.dtype} from heads "
                             f"{head_start}.. of a {tuple(k_cache.shape)} {k_cache.dtype} cache")
        self._layers_sent.add(layer_idx)
        self._put(self._pack_blocks(layer_idx, k_cache, v_cache, ids, head_start))

    def finish(self, first_token_id: int) -> None:
        if self._finished:
            raise RuntimeError("finish called twice")
        self._finished = True
        self._put(FinalMsg(int(first_token_id)))

    def poll(self) -> KVPoll:
        with self._lock:
            return self._state

    def abort(self) -> None:
        with self._lock:
            if self._aborted or self._state in (KVPoll.DONE, KVPoll.FAILED):
                return
            self._aborted = True
        self._put(AbortMsg("aborted by the prefill side"))
        self._set_failed("aborted")

    def close(self) -> None:
        """Abort unless DONE. Never blocks (it runs on the engine's step loop): the thread ends by itself
        once its last network call returns, bounded by the lease; `join` waits for that."""
        if self._closed:
            return
        if self.poll() != KVPoll.DONE:
            self.abort()
        self._closed = True

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the background thread to end; True if it has (or never started)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            return not thread.is_alive()
        return True

    # -- for transports ------------------------------------------------------------------------------

    def _pack_pages(self, layer_idx: int, k_pages: torch.Tensor, v_pages: torch.Tensor) -> LayerMsg:
        """On the caller's thread: copy a layer's (validated) pages into a message. A transport with its
        own wire layout overrides this and `_pack_blocks`."""
        msg = self._new_msg(layer_idx, k_pages.device)
        pack_layer(k_pages, v_pages, out=msg.payload)
        return msg

    def _pack_blocks(self, layer_idx: int, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
                     head_start: int) -> LayerMsg:
        msg = self._new_msg(layer_idx, k_cache.device)
        pack_blocks(k_cache, v_cache, block_ids, head_start, self.spec.num_kv_heads, out=msg.payload)
        return msg

    @abc.abstractmethod
    def _run(self, messages: Iterator[Message]) -> None:
        """Ship every message; return after FinalMsg (then call `_set_done`) or AbortMsg. Raise on error."""

    def _recycle(self, msg: LayerMsg) -> None:
        """The layer's bytes are fully shipped (copied out or delivered): its buffer may be reused."""
        POOL.release(msg.buffer)

    def _record(self, layer_idx: int, offset: int, data: torch.Tensor | bytes | memoryview) -> int:
        """The checksum of a data message about to be shipped; also adds it to the transfer digest."""
        value = checksum(data)
        self.digest.add(layer_idx, offset, len(data), value)
        self.bytes_sent += len(data)
        return value

    def _set_transferring(self) -> None:
        with self._lock:
            if self._state == KVPoll.WAITING:
                self._state = KVPoll.TRANSFERRING

    def _set_done(self) -> None:
        with self._lock:
            if self._state != KVPoll.FAILED:
                self._state = KVPoll.DONE

    def _set_failed(self, reason: str) -> None:
        with self._lock:
            if self._state != KVPoll.DONE and self._state != KVPoll.FAILED:
                self._state = KVPoll.FAILED
                self.error = reason

    def remaining(self) -> float:
        """Seconds left on the lease (>= 0): the bound for any blocking network call."""
        return max(0.0, self.deadline - self._clock())

    # -- internals -------------------------------------------------------------------------------------

    def _check_layer(self, layer_idx: int) -> None:
        if not 0 <= layer_idx < self.spec.num_layers or layer_idx in self._layers_sent:
            raise ValueError(f"layer {layer_idx} is out of range or already sent")
        if self._finished:
            raise RuntimeError("send_layer after finish")

    def _new_msg(self, layer_idx: int, device: torch.device) -> LayerMsg:
        return LayerMsg(layer_idx, POOL.acquire(self.spec.layer_nbytes, device))

    def _put(self, msg: Message) -> None:
        self._queue.put(msg)
        self._start()

    def _start(self) -> None:
        """Start the background thread (once). On the first message by default; a transport with a
        handshake calls it from its constructor so the handshake overlaps the first layer's compute."""
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._main, name=f"kv-send-{self.spec.transfer_id}",
                                                daemon=True)
                self._thread.start()

    def _messages(self) -> Iterator[Message]:
        while True:
            try:
                msg = self._queue.get(timeout=max(self.remaining(), 1e-3))
            except queue.Empty:
                raise TransferError(f"lease of {self.spec.lease_seconds:g}s expired before finish()") from None
            if self._aborted and not isinstance(msg, AbortMsg):
                continue  # drop what was queued before the abort; the AbortMsg follows
            if not isinstance(msg, AbortMsg) and self.remaining() <= 0:
                raise TransferError(f"lease of {self.spec.lease_seconds:g}s expired")
            yield msg
            if isinstance(msg, FinalMsg | AbortMsg):
                return

    def _main(self) -> None:
        try:
            self._run(self._messages())
        except Exception as exc:  # the transfer fails; the prefill side only needs to know that
            log.info("kv sender %s failed: %s", self.spec.transfer_id, exc)
            self._set_failed(f"{type(exc).__name__}: {exc}")
        else:
            if self.poll() != KVPoll.DONE:
                self._set_failed(self.error or "ended without the final message")
