"""The `dist` transport: KV pages over torch.distributed point-to-point (gloo), one group per worker pair.

Life of one transfer:
1. Each decode rank process runs one `DistKVEndpoint`: a TCPStore server on (host, port 0) whose real
   address it advertises (`endpoint.address`, put in the Prefill request's KVTarget).
2. The decode side makes a `DistKVReceiver` (registered with the endpoint by transfer_id); its thread
   waits to be told that the sender has announced itself.
3. The prefill side's `DistKVSender` thread, on the first queued layer, gets the cached link to that
   address (TCPStore client + a pair id), takes a fresh gloo tag for the transfer (`store.add`),
   writes "<pair_id>:<tag>" to `xfer/<transfer_id>` with compare_set, and rings the endpoint's
   doorbell (`ann/<n>` = transfer_id, n from a counter); then it gets the pair group (building it the
   first time: rank 0; pair_group.py). The endpoint's watcher thread, blocked in store.wait on the
   next doorbell key, wakes the receiver, which reads the announcement, gets its side of the same
   group (rank 1) and posts receives on that tag. (One blocking watcher instead of every waiting
   receiver polling the store.)
4. Per layer the sender sends an 8-int64 header (kind, layer, size, checksum, spec fingerprint, header crc)
   then the packed pages. The receiving thread only receives: it hands each layer to the endpoint's
   writer thread (checksum, scatter into the blocks) and posts the next receive at once. gloo moves
   data only once the matching receive is posted, so checking layer l must not delay layer l+1.
5. FINAL carries the first token and the transfer checksum → receiver DONE. The sender is DONE when
   FINAL has been handed to gloo (there is no ack channel).

Failures: the sender process dies → gloo raises on the receiver at once → FAILED (and the group is
evicted on both sides). The receiver gives up (abort/close/checksum) → it sets `xfer/<id>/abort`,
which the sender checks before every message and answers with an ABORT header; until that (or FINAL)
arrives the receiver thread keeps draining without writing, so the pair's stream stays in step. A
receiver closed before any announcement claims the key first (compare_set), so the sender then fails
without sending anything. Every blocking call is bounded by the lease.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.distributed import ProcessGroupGloo, TCPStore

from cluster.transfer.base import TransferError, TransferSpec
from cluster.transfer.buffers import POOL
from cluster.transfer.pair_group import (
    HEADER_BYTES,
    KIND_ABORT,
    KIND_DATA,
    KIND_FINAL,
    KIND_PAD,
    RECEIVER_RANK,
    SENDER_RANK,
    Header,
    local_host_for,
    make_pair_group,
    slot_nbytes,
    wait_work,
)
from cluster.transfer.receiver_core import ReceiverCore
from cluster.transfer.registered import CoreReceiver
from cluster.transfer.sender_core import AbortMsg, LayerMsg, Message, QueuedSender

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0  # store connection and group formation
ABORTED = "ABORTED"  # announcement value a receiver claims when it gives up before the sender came
DOORBELL_COUNTER = "ann/count"
CLOSING = "\0closing"  # the doorbell value that stops the watcher (never a transfer id)


def _announce_key(transfer_id: str) -> str:
    return f"xfer/{transfer_id}"


def _abort_key(transfer_id: str) -> str:
    return f"xfer/{transfer_id}/abort"


def _broken_key(pair_id: str) -> str:
    return f"pair/{pair_id}/broken"


def _doorbell_key(n: int) -> str:
    return f"ann/{n}"


# --- decode side -------------------------------------------------------------------------------------


class DistKVEndpoint:
    """The decode rank's rendezvous point and its cache of pair groups (rank 1 of each)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.host = host
        self.connect_timeout_s = connect_timeout_s
        self.store: TCPStore | None = TCPStore(host, port, is_master=True, wait_for_workers=False,
                                               timeout=datetime.timedelta(seconds=connect_timeout_s))
        self.port = self.store.port  # the real one when port=0
        self._lock = threading.Lock()
        self._groups: dict[str, ProcessGroupGloo] = {}
        self._group_locks: dict[str, threading.Lock] = {}
        self._receivers: dict[str, DistKVReceiver] = {}
        self._closed = False
        # One writer for every receiver of this endpoint: FIFO keeps each transfer's messages in order,
        # and checksum + scatter are CPU-bound, so more threads would only contend for the same cores.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-recv-write")
        # The watcher blocks in store.wait, which holds its client's lock: it gets a client of its own.
        self._watch_store = TCPStore(host, self.port, is_master=False,
                                     timeout=datetime.timedelta(seconds=connect_timeout_s))
        self._watcher = threading.Thread(target=self._watch, name="kv-recv-watch", daemon=True)
        self._watcher.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def group(self, pair_id: str) -> ProcessGroupGloo:
        with self._lock:
            if self._closed:
                raise TransferError("endpoint closed")
            lock = self._group_locks.setdefault(pair_id, threading.Lock())
        with lock:  # one construction per pair; other receivers of the same pair wait for it
            group = self._groups.get(pair_id)
            if group is None:
                group = make_pair_group(self.store, pair_id, RECEIVER_RANK, self.host, self.connect_timeout_s)
                with self._lock:
                    self._groups[pair_id] = group
            return group

    def evict(self, pair_id: str) -> None:
        """Forget a broken group, and tell the sender side (it may not have noticed: a corrupt header)."""
        with self._lock:
            self._groups.pop(pair_id, None)
            self._group_locks.pop(pair_id, None)
            store = self.store
        if store is not None:
            store.set(_broken_key(pair_id), "1")

    def num_groups(self) -> int:
        return len(self.pair_ids())

    def pair_ids(self) -> list[str]:
        with self._lock:
            return list(self._groups)

    def _add(self, receiver: DistKVReceiver) -> None:
        with self._lock:
            if self._closed:
                raise TransferError("endpoint closed")
            if receiver.spec.transfer_id in self._receivers:
                raise ValueError(f"transfer {receiver.spec.transfer_id!r} already has a receiver")
            self._receivers[receiver.spec.transfer_id] = receiver

    def _discard(self, receiver: DistKVReceiver) -> None:
        with self._lock:
            if self._receivers.get(receiver.spec.transfer_id) is receiver:
                del self._receivers[receiver.spec.transfer_id]

    def _watch(self) -> None:
        """Wake the receiver named by each doorbell key, in order, until close() rings CLOSING."""
        store, n = self._watch_store, 1
        while True:
            key = _doorbell_key(n)
            try:
                store.wait([key], datetime.timedelta(days=1))  # a timeout would log a C++ warning
                transfer_id = store.get(key).decode()
                store.delete_key(key)
            except Exception as exc:  # the store went away: receivers fall back to polling
                log.warning("kv endpoint %s: watcher stopped: %s", self.address, exc)
                return
            if transfer_id == CLOSING:
                return
            with self._lock:
                receiver = self._receivers.get(transfer_id)
            if receiver is not None:
                receiver._announced.set()
            n += 1

    def close(self, timeout_s: float = 5.0) -> None:
        """Fail every live receiver, wait up to timeout_s for their threads, drop the groups and the store.
        Idempotent. A thread still blocked in gloo after that ends with its group (or its lease)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            receivers = list(self._receivers.values())
        for receiver in receivers:
            receiver.close()
        deadline = time.monotonic() + timeout_s
        for receiver in receivers:
            if not receiver.join(max(0.0, deadline - time.monotonic())):
                log.warning("kv receiver %s still draining at endpoint close", receiver.spec.transfer_id)
        self.writer.shutdown(wait=True)
        assert self.store is not None
        self.store.set(_doorbell_key(self.store.add(DOORBELL_COUNTER, 1)), CLOSING)
        self._watcher.join(timeout_s)
        with self._lock:
            self._groups.clear()
            self._group_locks.clear()
        self._watch_store = None
        self.store = None  # stops the TCPStore server once the receivers' threads let go of it


class DistKVReceiver(CoreReceiver):
    def __init__(self, spec: TransferSpec, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 dest_block_ids: list[int], endpoint: DistKVEndpoint) -> None:
        self.spec = spec
        self.core = ReceiverCore(spec, k_caches, v_caches, dest_block_ids)
        self.endpoint = endpoint
        self._stop = threading.Event()
        self._announced = threading.Event()  # set by the endpoint's watcher
        self._told_sender = False
        self._store = endpoint.store  # ours until the thread ends, even if the endpoint closes first
        endpoint._add(self)
        self._thread = threading.Thread(target=self._main, name=f"kv-recv-{spec.transfer_id}", daemon=True)
        self._thread.start()

    def abort(self) -> None:
        self.core.fail("aborted by the decode side")
        self._stop.set()

    def close(self) -> None:
        """Never blocks (the engine calls it from its step loop). A thread still draining the sender's
        stream ends by itself — at the sender's FINAL or ABORT, at worst two leases from now."""
        self.core.fail("closed before the transfer finished")
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the receiving thread (and its last write) to end; True if it has."""
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the receiving thread --------------------------------------------------------------------------

    def _remaining(self) -> float:
        return self.core.deadline - time.monotonic()

    def _main(self) -> None:
        try:
            self._transfer()
        finally:
            self.endpoint._discard(self)

    def _transfer(self) -> None:
        store, tid = self._store, self.spec.transfer_id
        try:
            announcement = self._await_announcement()
            if announcement is None:
                return
            store.delete_key(_announce_key(tid))
            if announcement.startswith(ABORTED):
                self.core.on_abort(announcement[len(ABORTED) + 1:])
                return
            pair_id, tag = announcement.rsplit(":", 1)
        except Exception as exc:
            self.core.fail(f"rendezvous failed: {exc}")
            return
        try:
            self._receive(self.endpoint.group(pair_id), int(tag))
        except Exception as exc:  # gloo: peer gone, timeout (the group is now broken), or corrupt header
            self.core.fail(f"sender gone or stream broken: {exc}")
            self.endpoint.evict(pair_id)
        finally:
            store.delete_key(_abort_key(tid))

    def _await_announcement(self) -> str | None:
        """The sender's "<pair>:<tag>" (or "ABORTED:..."); None if we gave up first and told it so."""
        store, key = self._store, _announce_key(self.spec.transfer_id)
        while True:
            # The doorbell wakes us at once; the 50 ms re-check covers a watcher that has stopped.
            if self._announced.wait(timeout=0.05) or store.check([key]):
                return store.get(key).decode()
            if self._stop.is_set() or self._remaining() <= 0:
                claimed = store.compare_set(key, "", f"{ABORTED}:receiver gave up").decode()
                if claimed.startswith(ABORTED):
                    self.core.fail(self.core.error or f"lease of {self.spec.lease_seconds:g}s expired")
                    return None  # the sender will find the key taken and fail without sending
                return claimed  # the sender announced just now: drain its messages

    def _recv_timeout(self) -> float:
        # A posted gloo recv cannot be cancelled and a timed-out one breaks the whole pair group, so
        # after failing (lease included) the thread keeps draining until the sender's ABORT or FINAL.
        # The sender's lease started after ours and it sends ABORT when it ends: one more lease covers it.
        return max(self._remaining(), 0.0) + self.spec.lease_seconds

    def _receive(self, group: ProcessGroupGloo, tag: int) -> None:
        """Receive slots 0..L (pair_group.py) with the next two always posted; hand each to the writer."""
        last_slot, layer_nbytes = self.spec.num_layers, self.spec.layer_nbytes
        posted: deque[tuple[int, torch.Tensor, object]] = deque()

        def post(slot: int) -> None:
            buf = POOL.acquire(slot_nbytes(slot, last_slot, layer_nbytes))
            posted.append((slot, buf, group.recv([buf], SENDER_RANK, tag)))

        post(0)
        post(1)
        last: Future | None = None
        try:
            while posted:
                slot, buf, work = posted.popleft()
                wait_work(work, self._recv_timeout())
                header = Header.read_from(buf)
                if header.kind == KIND_DATA and slot < last_slot:
                    if slot + 2 <= last_slot:
                        post(slot + 2)
                    last = self.endpoint.writer.submit(self._write, header, buf)
                    continue
                if header.kind == KIND_FINAL and slot == last_slot:
                    last = self.endpoint.writer.submit(self._final, header)
                elif header.kind == KIND_ABORT:
                    last = self.endpoint.writer.submit(self.core.on_abort, "")
                    for _, pad, pad_work in posted:  # the sender fills it with a PAD
                        wait_work(pad_work, self._recv_timeout())
                        POOL.release(pad)
                else:
                    raise TransferError(f"unexpected message kind {header.kind} in slot {slot}")
                POOL.release(buf)
                return
        finally:
            if last is not None:
                last.result()  # the thread ends only when its transfer is settled

    def _write(self, header: Header, message: torch.Tensor) -> None:
        """On the writer thread: checksum, scatter; on failure, ask the sender to stop (we keep draining)."""
        payload = message[HEADER_BYTES:]
        accepted = self.core.on_data(header.layer_idx, 0, payload, header.checksum, header.fingerprint)
        POOL.release(message)  # scattered (or refused): the core keeps no reference to it
        if not accepted:
            if not self._told_sender:
                self._told_sender = True
                self._store.set(_abort_key(self.spec.transfer_id), "1")

    def _final(self, header: Header) -> None:
        # FINAL's layer field carries the number of layers the sender sent
        self.core.on_final(header.first_token_id, header.layer_idx, header.checksum, header.fingerprint)


# --- prefill side ------------------------------------------------------------------------------------


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


class DistKVSender(QueuedSender):
    HEADROOM = HEADER_BYTES  # send_layer packs after room for the header: one message per layer

    def __init__(self, spec: TransferSpec, address: str, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        super().__init__(spec)
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self._slot = 0  # the next message slot on our tag (pair_group.py: framing)
        # Sends in flight, oldest first: checksumming layer l+1 overlaps the network moving layer l.
        self._inflight: deque[tuple[object, torch.Tensor, Callable[[], None] | None]] = deque()

    def _run(self, messages: Iterator[Message]) -> None:
        link = get_link(self.address, self.connect_timeout_s)
        if link.store.check([_broken_key(link.pair_id)]):  # the decode side dropped our group
            evict_link(link)
            link = get_link(self.address, self.connect_timeout_s)
        tid = self.spec.transfer_id
        first = next(messages)
        if isinstance(first, AbortMsg):  # nothing sent yet: tell the receiver through the store only
            link.store.compare_set(_announce_key(tid), "", f"{ABORTED}:{first.reason}")
            return
        tag = link.store.add(f"pair/{link.pair_id}/tags", 1)
        announcement = f"{link.pair_id}:{tag}"
        if link.store.compare_set(_announce_key(tid), "", announcement).decode() != announcement:
            raise TransferError("the receiver gave up before the transfer started")
        link.store.set(_doorbell_key(link.store.add(DOORBELL_COUNTER, 1)), tid)
        try:
            group = link.group()
            msg: Message | None = first
            while msg is not None:
                self._ship(group, tag, link, msg)
                try:
                    msg = next(messages, None)
                except TransferError:  # our own lease ran out: end the receiver's drain cleanly
                    self._abort(group, tag)
                    raise
        except TransferError:
            raise
        except Exception as exc:  # gloo error or timeout: the group is unusable from now on
            evict_link(link)
            raise TransferError(f"send to {self.address} failed: {exc}") from exc

    def _ship(self, group: ProcessGroupGloo, tag: int, link: _Link, msg: Message) -> None:
        if isinstance(msg, AbortMsg):
            self._abort(group, tag)
        elif link.store.check([_abort_key(self.spec.transfer_id)]):
            self._abort(group, tag)
            raise TransferError("the receiver aborted the transfer")
        elif isinstance(msg, LayerMsg):
            message = msg.buffer
            digest = self._record(msg.layer_idx, 0, msg.payload)
            Header(KIND_DATA, msg.layer_idx, msg.payload.numel(), digest, self.fingerprint).write_into(message)
            # gloo sends host memory (CUDA pages are staged here); the buffer is reused once sent
            self._send(group, tag, message.cpu(), on_sent=lambda: self._recycle(msg))
            self._set_transferring()
        elif self._slot != self.spec.num_layers:
            self._abort(group, tag)
            raise TransferError(f"finish() after {self._slot} of {self.spec.num_layers} layers")
        else:  # FINAL; its layer field carries the number of layers sent
            message = torch.empty(HEADER_BYTES, dtype=torch.uint8)
            Header(KIND_FINAL, self.spec.num_layers, 0, self.digest.value(), self.fingerprint,
                   msg.first_token_id).write_into(message)
            self._send(group, tag, message)
            self._wait_sent()
            self._set_done()

    def _abort(self, group: ProcessGroupGloo, tag: int) -> None:
        """ABORT in the next slot, then a PAD for the one slot the receiver still has posted."""
        for kind in (KIND_ABORT, KIND_PAD):
            if self._slot > self.spec.num_layers:
                break
            message = torch.zeros(slot_nbytes(self._slot, self.spec.num_layers, self.spec.layer_nbytes),
                                  dtype=torch.uint8)
            Header(kind).write_into(message)
            self._send(group, tag, message)
        self._wait_sent()

    def _send(self, group: ProcessGroupGloo, tag: int, message: torch.Tensor,
              on_sent: Callable[[], None] | None = None) -> None:
        """Start sending the next slot; keeps at most two sends in flight."""
        expected = slot_nbytes(self._slot, self.spec.num_layers, self.spec.layer_nbytes)
        if message.numel() != expected:
            raise TransferError(f"slot {self._slot} takes {expected} bytes, not {message.numel()}")
        # the message stays referenced here until its send completed
        self._inflight.append((group.send([message], RECEIVER_RANK, tag), message, on_sent))
        self._slot += 1
        self._wait_sent(keep=1)

    def _wait_sent(self, keep: int = 0) -> None:
        while len(self._inflight) > keep:
            work, _, on_sent = self._inflight.popleft()
            # The receiver drains up to one lease past its own (DistKVReceiver._recv_timeout).
            wait_work(work, self.remaining() + self.spec.lease_seconds)
            if on_sent is not None:
                on_sent()
