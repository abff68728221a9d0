"""The decode side of the `dist` transport (dist.py tells a transfer's whole life).

Life of one transfer here:
1. The decode rank's `DistKVEndpoint` serves a TCPStore; its watcher thread blocks popping the
   doorbell queue. A `DistKVReceiver` registers with it by transfer_id and starts its thread, which
   waits to be woken.
2. The sender's doorbell carries its announcement ("<pair>:<tag>"): the watcher hands it to the
   receiver, whose thread gets its side of the pair group (rank 1) and at once posts recvs for the
   first two slots (pair_group.SlotPlan; `plan.depth` of them once the first chunk has landed).
3. Each chunk that lands is checked (header, checksum) and scattered into its destination blocks by
   this thread, while the next slots' recvs stay posted, so checking one chunk never stalls the link;
   then the slot `depth` ahead is posted.
4. FINAL: the transfer digest and the first token → DONE.
Failures: a checksum mismatch, abort() or close() fails the core and sets `xfer/<id>/abort`; the
thread keeps draining (writing nothing) until the sender's ABORT and PADs, or FINAL, so the pair's
stream stays in step for the next transfer. gloo errors (sender died) fail it at once and evict the
group. Giving up before any announcement claims the announce key, so the sender never starts.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections import deque

import torch
from torch.distributed import ProcessGroupGloo, TCPStore

from cluster.transfer import host_copy
from cluster.transfer.base import TransferError, TransferSpec
from cluster.transfer.buffers import POOL
from cluster.transfer.dist_keys import (
    ABORTED,
    CLOSING,
    CONNECT_TIMEOUT_S,
    DOORBELL,
    abort_key,
    announce_key,
    broken_key,
    parse_doorbell,
)
from cluster.transfer.pair_group import (
    HEADER_BYTES,
    IDLE_DEPTH,
    KIND_ABORT,
    KIND_DATA,
    KIND_FINAL,
    RECEIVER_RANK,
    SENDER_RANK,
    Header,
    SlotPlan,
    make_pair_group,
    wait_work,
)
from cluster.transfer.receiver_core import ReceiverCore
from cluster.transfer.registered import CoreReceiver

log = logging.getLogger(__name__)


class DistKVEndpoint:
    """The decode rank's rendezvous point and its cache of pair groups (rank 1 of each)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.host = host
        self.connect_timeout_s = connect_timeout_s
        host_copy.available()  # the fused scatter (host_copy.py), loaded before any receiver's lease starts
        self.store: TCPStore | None = TCPStore(host, port, is_master=True, wait_for_workers=False,
                                               timeout=datetime.timedelta(seconds=connect_timeout_s))
        self.port = self.store.port  # the real one when port=0
        self._lock = threading.Lock()
        self._groups: dict[str, ProcessGroupGloo] = {}
        self._group_locks: dict[str, threading.Lock] = {}
        self._receivers: dict[str, DistKVReceiver] = {}
        self._closed = False
        # The watcher blocks popping the doorbell queue, which holds its client's lock: it gets a client of
        # its own, whose timeout only bounds that wait (a timeout would log a C++ warning).
        self._watch_store = TCPStore(host, self.port, is_master=False, timeout=datetime.timedelta(days=1))
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
            store.set(broken_key(pair_id), "1")

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
        """Wake the receiver named by each doorbell, in order, until close() rings CLOSING."""
        store = self._watch_store
        while True:
            try:
                value = store.queue_pop(DOORBELL, True).decode()
            except Exception as exc:  # the store went away: receivers fall back to polling
                log.warning("kv endpoint %s: watcher stopped: %s", self.address, exc)
                return
            if value == CLOSING:
                return
            transfer_id, announcement = parse_doorbell(value)
            with self._lock:
                receiver = self._receivers.get(transfer_id)
            if receiver is not None:
                receiver._announce(announcement)

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
        assert self.store is not None
        self.store.queue_push(DOORBELL, CLOSING)
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
        self.plan = SlotPlan(spec)
        self.endpoint = endpoint
        self._stop = threading.Event()
        self._announced = threading.Event()  # set by the endpoint's watcher
        self._announcement: str | None = None
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

    def _announce(self, announcement: str) -> None:
        """From the endpoint's watcher: the sender claimed the transfer with this announcement."""
        self._announcement = announcement
        self._announced.set()

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
            if announcement.startswith(ABORTED):
                store.delete_key(announce_key(tid))
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
            store.delete_key(announce_key(tid))
            store.delete_key(abort_key(tid))

    def _await_announcement(self) -> str | None:
        """The sender's "<pair>:<tag>" (or "ABORTED:..."); None if we gave up first and told it so."""
        store, key = self._store, announce_key(self.spec.transfer_id)
        while True:
            # The doorbell wakes us at once; the 50 ms re-check covers a watcher that has stopped.
            if self._announced.wait(timeout=0.05) and self._announcement is not None:
                return self._announcement
            if store.check([key]):
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
        """Receive every slot (pair_group.SlotPlan) with the next `depth` always posted; write each chunk."""
        plan = self.plan
        posted: deque[tuple[int, torch.Tensor, object]] = deque()

        def post(slot: int) -> None:
            buf = POOL.acquire(plan.slot_nbytes(slot))
            posted.append((slot, buf, group.recv([buf], SENDER_RANK, tag)))

        next_slot = 0
        while next_slot <= min(IDLE_DEPTH - 1, plan.final_slot):  # SlotPlan.posted_after_abort relies on this
            post(next_slot)
            next_slot += 1
        while posted:
            slot, buf, work = posted.popleft()
            wait_work(work, self._recv_timeout())
            header = Header.read_from(buf)
            if header.kind == KIND_DATA and slot < plan.final_slot:
                while next_slot <= min(slot + plan.depth, plan.final_slot):  # before the checks below:
                    post(next_slot)  # the link never waits on them
                    next_slot += 1
                self._write(slot, header, buf)
                continue
            if header.kind == KIND_FINAL and slot == plan.final_slot:
                # FINAL's layer field carries the number of layers the sender sent
                self.core.on_final(header.first_token_id, header.layer_idx, header.checksum, header.fingerprint)
            elif header.kind == KIND_ABORT:
                self.core.on_abort("")
                for _, pad, pad_work in posted:  # the sender fills each with a PAD
                    wait_work(pad_work, self._recv_timeout())
                    POOL.release(pad)
            else:
                raise TransferError(f"unexpected message kind {header.kind} in slot {slot}")
            POOL.release(buf)
            return

    def _write(self, slot: int, header: Header, message: torch.Tensor) -> None:
        """Check and scatter one chunk; on failure, ask the sender to stop (we keep draining)."""
        chunk = self.plan.chunk(slot)[1]
        if header.nbytes != chunk.nbytes:
            self.core.fail(f"slot {slot}: header says {header.nbytes} bytes, the plan {chunk.nbytes}")
            accepted = False
        else:
            payload = message[HEADER_BYTES:HEADER_BYTES + chunk.nbytes]
            accepted = self.core.on_data(header.layer_idx, header.offset, payload, header.checksum,
                                         header.fingerprint)
        POOL.release(message)  # scattered (or refused): the core keeps no reference to it
        if not accepted and not self._told_sender:
            self._told_sender = True
            self._store.set(abort_key(self.spec.transfer_id), "1")
