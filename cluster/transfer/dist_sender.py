"""The prefill side of the `dist` transport (dist.py tells a transfer's whole life).

Life of one transfer here:
1. `DistKVSender(spec, address)` starts its thread at once: it gets the cached `_Link` to the decode
   rank's TCPStore, takes the pair's next gloo tag, claims `xfer/<id>` with "<pair>:<tag>"
   (compare_set: a receiver that already gave up owns the key, and we fail without sending), rings
   the doorbell (a store queue push), and gets the pair group (building it the first time). Three
   store round trips in all, overlapping the first layer's compute.
2. `send_layer_blocks` (the engine's compute thread) gathers each chunk of the layer straight into its
   message in one pooled buffer (SlotPlan layout: header room, then whole blocks of K and/or V), and
   checksums it right away, while it is still in cache, and writes its header. (Pages on a GPU are
   gathered there and checksummed by the sending thread once it has staged them to host memory.)
3. The thread hands each chunk to gloo, keeping up to `plan.depth` sends in flight (as many as the
   receiver keeps recvs posted); a layer's buffer goes back to the pool once its last chunk is sent.
4. `finish(token)` → FINAL (first token, transfer digest); DONE once gloo has taken it.
A receiver that gives up sets `xfer/<id>/abort`, checked before each layer at most every
ABORT_CHECK_S: we answer with ABORT and PADs for its posted slots, so its stream ends cleanly.
"""

from __future__ import annotations

import datetime
import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator

import torch
from torch.distributed import ProcessGroupGloo, TCPStore

from cluster.transfer import host_copy
from cluster.transfer.base import TransferError, TransferSpec
from cluster.transfer.buffers import POOL
from cluster.transfer.codec import ROW_BYTES, checksum
from cluster.transfer.dist_keys import (
    ABORTED,
    CONNECT_TIMEOUT_S,
    DOORBELL,
    abort_key,
    announce_key,
    broken_key,
    doorbell_value,
)
from cluster.transfer.pair_group import (
    HEADER_BYTES,
    KIND_ABORT,
    KIND_DATA,
    KIND_FINAL,
    KIND_PAD,
    RECEIVER_RANK,
    SENDER_RANK,
    Chunk,
    Header,
    SlotPlan,
    local_host_for,
    make_pair_group,
    wait_work,
)
from cluster.transfer.sender_core import AbortMsg, LayerMsg, Message, QueuedSender

# A store round trip per layer is noise next to a slow prefill but not next to a burst of layers
# already computed; a receiver that gave up just drains a few more chunks.
ABORT_CHECK_S = 0.01


class _Link:
    """This process's connection to one decode endpoint: store client + pair group (rank 0)."""

    def __init__(self, address: str, connect_timeout_s: float) -> None:
        host, port = address.rsplit(":", 1)
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self.store = TCPStore(host, int(port), is_master=False,
                              timeout=datetime.timedelta(seconds=connect_timeout_s))
        self.local_host = local_host_for(host)
        self.pair_id = uuid.uuid4().hex
        self.lock = threading.Lock()
        self._group: ProcessGroupGloo | None = None
        self._tags = itertools.count(1)  # only this process sends on this pair: no store round trip

    def next_tag(self) -> int:
        with self.lock:
            return next(self._tags)

    def group(self) -> ProcessGroupGloo:
        with self.lock:
            if self._group is None:
                self._group = make_pair_group(self.store, self.pair_id, SENDER_RANK, self.local_host,
                                              self.connect_timeout_s)
            return self._group


_links: dict[str, _Link] = {}
_links_lock = threading.Lock()


def get_link(address: str, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> _Link:
    with _links_lock:
        link = _links.get(address)
        if link is None:
            link = _links[address] = _Link(address, connect_timeout_s)
        return link


def evict_link(link: _Link) -> None:
    """Forget a broken link; the next transfer to that address builds a new pair."""
    with _links_lock:
        if _links.get(link.address) is link:
            del _links[link.address]


def close_all() -> None:
    """Drop every cached link (store clients and pair groups); worker shutdown, tests."""
    with _links_lock:
        _links.clear()


def num_links() -> int:
    with _links_lock:
        return len(_links)


class FramedLayer(LayerMsg):
    """One layer as its chunk messages back to back (SlotPlan layout); sealed once headers are written."""

    def __init__(self, layer_idx: int, buffer: torch.Tensor) -> None:
        super().__init__(layer_idx, buffer)
        self.is_sealed = False


class DistKVSender(QueuedSender):
    def __init__(self, spec: TransferSpec, address: str, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        host_copy.available()  # load the fused copy kernels before the lease starts
        super().__init__(spec)
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self.plan = SlotPlan(spec)
        self._slot = 0  # the next message slot on our tag
        self._inflight: deque[tuple[object, torch.Tensor, Callable[[], None] | None]] = deque()
        self._abort_checked_at = float("-inf")
        self._start()  # the handshake starts now, not when the first layer is ready

    # -- packing, on the caller's thread ----------------------------------------------------------

    def _pack_pages(self, layer_idx: int, k_pages: torch.Tensor, v_pages: torch.Tensor) -> LayerMsg:
        msg = FramedLayer(layer_idx, POOL.acquire(self.plan.layer_buffer_nbytes, k_pages.device))
        for chunk in self.plan.chunks:
            for out, (half, first, count) in self._pieces(msg.buffer, chunk):
                out.copy_((k_pages, v_pages)[half][first:first + count])
            self._seal_if_host(msg, chunk)
        return msg

    def _pack_blocks(self, layer_idx: int, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
                     head_start: int) -> LayerMsg:
        msg = FramedLayer(layer_idx, POOL.acquire(self.plan.layer_buffer_nbytes, k_cache.device))
        heads = slice(head_start, head_start + self.spec.num_kv_heads)
        whole = heads == slice(0, k_cache.shape[2])
        rows = (host_copy.block_rows(k_cache), host_copy.block_rows(v_cache)) if whole else (None, None)
        if rows[0] is not None and rows[1] is not None:
            return self._pack_blocks_checksummed(msg, rows, block_ids)
        sources = [cache if whole else cache[:, :, heads] for cache in (k_cache, v_cache)]
        for chunk in self.plan.chunks:
            for out, (half, first, count) in self._pieces(msg.buffer, chunk):
                torch.index_select(sources[half], 0, block_ids[first:first + count], out=out)
            self._seal_if_host(msg, chunk)
        return msg

    def _pack_blocks_checksummed(self, msg: FramedLayer, rows: tuple[torch.Tensor, torch.Tensor],
                                 block_ids: torch.Tensor) -> FramedLayer:
        """Host caches: each chunk's blocks are gathered and checksummed in one pass (host_copy.py)."""
        for chunk in self.plan.chunks:
            weighted, pos = 0, chunk.start + HEADER_BYTES
            for half, first, count in chunk.pieces:
                nbytes = count * self.plan.block_bytes
                first_row = (pos - chunk.start - HEADER_BYTES) // ROW_BYTES
                weighted += host_copy.gather_checksummed(rows[half], block_ids[first:first + count],
                                                         msg.buffer[pos:pos + nbytes], first_row)
                pos += nbytes
            self._seal_chunk(msg, msg.buffer, chunk, host_copy.message_checksum(weighted, chunk.nbytes))
        msg.is_sealed = True
        return msg

    def _pieces(self, buffer: torch.Tensor, chunk: Chunk) -> Iterator[tuple[torch.Tensor, tuple[int, int, int]]]:
        """Typed views of where each piece of a chunk's pages goes in a layer buffer."""
        start = chunk.start + HEADER_BYTES
        for piece in chunk.pieces:
            nbytes = piece[2] * self.plan.block_bytes
            view = buffer[start:start + nbytes].view(self.spec.torch_dtype)
            yield view.view(piece[2], *self.spec.page_shape[1:]), piece
            start += nbytes

    def _seal_if_host(self, msg: FramedLayer, chunk: Chunk) -> None:
        # Checksumming each chunk right after its gather reads it from cache. Device pages are checksummed
        # on the sending thread instead, after it staged them to host memory (gloo sends host memory).
        if msg.buffer.device.type == "cpu":
            self._seal_chunk(msg, msg.buffer, chunk)
            msg.is_sealed = chunk is self.plan.chunks[-1]

    def _seal(self, msg: FramedLayer, host: torch.Tensor) -> None:
        for chunk in self.plan.chunks:
            self._seal_chunk(msg, host, chunk)
        msg.is_sealed = True

    def _seal_chunk(self, msg: FramedLayer, host: torch.Tensor, chunk: Chunk, value: int | None = None) -> None:
        payload = host[chunk.start + HEADER_BYTES:chunk.start + HEADER_BYTES + chunk.nbytes]
        value = self._record(msg.layer_idx, chunk.offset, payload, value)
        Header(KIND_DATA, msg.layer_idx, chunk.nbytes, value, self.fingerprint,
               offset=chunk.offset).write_into(host[chunk.start:])

    def _record(self, layer_idx: int, offset: int, data: torch.Tensor | bytes | memoryview,
                value: int | None = None) -> int:
        """Checksum (unless the gather computed it: `value`) + digest only: bytes_sent counts what gloo
        has taken (it runs before the send here)."""
        if value is None:
            value = checksum(data)
        self.digest.add(layer_idx, offset, len(data), value)
        return value

    # -- the sending thread -------------------------------------------------------------------------

    def _run(self, messages: Iterator[Message]) -> None:
        link = get_link(self.address, self.connect_timeout_s)
        if link.store.check([broken_key(link.pair_id)]):  # the decode side dropped our group
            evict_link(link)
            link = get_link(self.address, self.connect_timeout_s)
        tid = self.spec.transfer_id
        if self._aborted:  # nothing sent yet: tell the receiver through the store only
            link.store.compare_set(announce_key(tid), "", f"{ABORTED}:{self.error or 'aborted'}")
            return
        tag = link.next_tag()
        announcement = f"{link.pair_id}:{tag}"
        if link.store.compare_set(announce_key(tid), "", announcement).decode() != announcement:
            raise TransferError("the receiver gave up before the transfer started")
        link.store.queue_push(DOORBELL, doorbell_value(tid, announcement))
        try:
            group = link.group()
            while True:
                while self._inflight and self._queue.empty():  # idle: settle sends (bytes_sent, buffers)
                    self._wait_sent(keep=len(self._inflight) - 1)
                try:
                    msg = next(messages, None)
                except TransferError:  # our own lease ran out: end the receiver's drain cleanly
                    self._abort(group, tag)
                    raise
                if msg is None:
                    return
                self._ship(group, tag, link, msg)
        except TransferError:
            raise
        except Exception as exc:  # gloo error or timeout: the group is unusable from now on
            evict_link(link)
            raise TransferError(f"send to {self.address} failed: {exc}") from exc

    def _ship(self, group: ProcessGroupGloo, tag: int, link: _Link, msg: Message) -> None:
        if isinstance(msg, AbortMsg):
            self._abort(group, tag)
        elif self._receiver_gave_up(link):
            self._abort(group, tag)
            raise TransferError("the receiver aborted the transfer")
        elif isinstance(msg, FramedLayer):
            host = msg.buffer
            if not msg.is_sealed:  # device pages: stage them here, off the compute thread
                host = msg.buffer.cpu()
                self._seal(msg, host)
            last = len(self.plan.chunks) - 1
            for j, chunk in enumerate(self.plan.chunks):
                on_sent = self._chunk_sent(chunk.nbytes, msg if j == last and host is msg.buffer else None)
                self._send(group, tag, host[chunk.start:chunk.start + HEADER_BYTES + chunk.nbytes], on_sent)
            self._set_transferring()
        elif self._slot != self.plan.final_slot:
            self._abort(group, tag)
            raise TransferError(f"finish() after {self._slot} of {self.plan.final_slot} chunks")
        else:  # FINAL; its layer field carries the number of layers sent
            message = torch.empty(HEADER_BYTES, dtype=torch.uint8)
            Header(KIND_FINAL, self.spec.num_layers, 0, self.digest.value(), self.fingerprint,
                   msg.first_token_id).write_into(message)
            self._send(group, tag, message)
            self._wait_sent()
            self._set_done()

    def _receiver_gave_up(self, link: _Link) -> bool:
        now = time.monotonic()
        if now - self._abort_checked_at < ABORT_CHECK_S:
            return False
        self._abort_checked_at = now
        return link.store.check([abort_key(self.spec.transfer_id)])

    def _chunk_sent(self, nbytes: int, layer: FramedLayer | None) -> Callable[[], None]:
        def sent() -> None:
            self.bytes_sent += nbytes
            if layer is not None:  # the layer's last chunk: its buffer may be reused
                self._recycle(layer)
        return sent

    def _abort(self, group: ProcessGroupGloo, tag: int) -> None:
        """ABORT in the next slot, then a PAD for each slot the receiver still has posted."""
        if self._slot <= self.plan.final_slot:
            slots = [self._slot, *self.plan.posted_after_abort(self._slot)]
            for kind, slot in zip([KIND_ABORT] + [KIND_PAD] * (len(slots) - 1), slots, strict=True):
                message = torch.zeros(self.plan.slot_nbytes(slot), dtype=torch.uint8)
                Header(kind).write_into(message)
                self._send(group, tag, message)
        self._wait_sent()

    def _send(self, group: ProcessGroupGloo, tag: int, message: torch.Tensor,
              on_sent: Callable[[], None] | None = None) -> None:
        """Start sending the next slot; keeps at most plan.depth sends in flight (the receiver's posted recvs)."""
        expected = self.plan.slot_nbytes(self._slot)
        if message.numel() != expected:
            raise TransferError(f"slot {self._slot} takes {expected} bytes, not {message.numel()}")
        # the message stays referenced here until its send completed
        self._inflight.append((group.send([message], RECEIVER_RANK, tag), message, on_sent))
        self._slot += 1
        self._wait_sent(keep=self.plan.depth)

    def _wait_sent(self, keep: int = 0) -> None:
        """Settle sends, oldest first, until at most `keep` are in flight (and any that already completed)."""
        while len(self._inflight) > keep or (self._inflight and self._inflight[0][0].is_completed()):
            work, _, on_sent = self._inflight.popleft()
            # The receiver drains up to one lease past its own (DistKVReceiver._recv_timeout).
            wait_work(work, self.remaining() + self.spec.lease_seconds)
            if on_sent is not None:
                on_sent()
