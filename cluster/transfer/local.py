"""The `local` transport: prefill and decode in one process (unified worker, tests).

Life of one transfer: the decode side makes a `LocalKVReceiver`, which registers its ReceiverCore in a
`LocalChannel` (a thread-safe dict keyed by transfer_id; one process-wide default). The prefill side's
`LocalKVSender` queues packed layers; its thread looks the receiver up and hands each message over
(checksum and all, so this path exercises the same validation as the network ones); the receiver
writes the pages into its blocks on that thread. `finish` ships the first token and the transfer
checksum; the receiver is then DONE. No receiver registered, or one that failed → the sender FAILS.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from cluster.transfer.base import KVPoll, KVReceiver, TransferError, TransferSpec
from cluster.transfer.receiver_core import ReceiverCore
from cluster.transfer.sender_core import FinalMsg, LayerMsg, Message, QueuedSender


class LocalChannel:
    """transfer_id -> the receiver waiting for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._receivers: dict[str, ReceiverCore] = {}

    def register(self, core: ReceiverCore) -> None:
        with self._lock:
            if core.spec.transfer_id in self._receivers:
                raise ValueError(f"transfer {core.spec.transfer_id!r} already has a receiver")
            self._receivers[core.spec.transfer_id] = core

    def unregister(self, core: ReceiverCore) -> None:
        with self._lock:
            if self._receivers.get(core.spec.transfer_id) is core:
                del self._receivers[core.spec.transfer_id]

    def lookup(self, transfer_id: str) -> ReceiverCore | None:
        with self._lock:
            return self._receivers.get(transfer_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._receivers)


DEFAULT_CHANNEL = LocalChannel()


class LocalKVSender(QueuedSender):
    def __init__(self, spec: TransferSpec, channel: LocalChannel | None = None) -> None:
        super().__init__(spec)
        self.channel = channel or DEFAULT_CHANNEL

    def _run(self, messages: Iterator[Message]) -> None:
        for msg in messages:
            core = self.channel.lookup(self.spec.transfer_id)
            if core is None:
                raise TransferError(f"no receiver registered for transfer {self.spec.transfer_id!r}")
            if isinstance(msg, LayerMsg):
                digest = self._record(msg.layer_idx, 0, msg.payload)
                payload = msg.payload.cpu()  # the receiver takes host bytes from every transport
                accepted = core.on_data(msg.layer_idx, 0, payload, digest, self.fingerprint)
                self._recycle(msg)  # scattered (or refused) synchronously: nothing refers to it any more
                if not accepted:
                    raise TransferError(f"receiver refused layer {msg.layer_idx}: {core.error}")
                self._set_transferring()
            elif isinstance(msg, FinalMsg):
                if not core.on_final(msg.first_token_id, self.spec.num_layers, self.digest.value(), self.fingerprint):
                    raise TransferError(f"receiver refused the final message: {core.error}")
                self._set_done()
            else:
                core.on_abort(msg.reason)


class LocalKVReceiver(KVReceiver):
    def __init__(self, spec: TransferSpec, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 dest_block_ids: list[int], channel: LocalChannel | None = None) -> None:
        self.spec = spec
        self.core = ReceiverCore(spec, k_caches, v_caches, dest_block_ids)
        self.channel = channel or DEFAULT_CHANNEL
        self.channel.register(self.core)

    def poll(self) -> KVPoll:
        state = self.core.poll()
        if state == KVPoll.FAILED:
            self.channel.unregister(self.core)  # the sender's next message finds no one and fails
        return state

    @property
    def first_token_id(self) -> int:
        return self.core.first_token_id

    @property
    def error(self) -> str | None:
        return self.core.error

    def abort(self) -> None:
        self.core.fail("aborted by the decode side")
        self.channel.unregister(self.core)

    def close(self) -> None:
        self.core.fail("closed before the transfer finished")  # no-op once DONE
        self.channel.unregister(self.core)
