"""The `local` transport: prefill and decode in one process (unified worker, tests).

Life of one transfer: the decode side makes a `LocalKVReceiver`, which registers its ReceiverCore in a
`LocalChannel` (a thread-safe dict keyed by transfer_id; one process-wide default). The prefill side's
`LocalKVSender` queues packed layers; its thread looks the receiver up and hands each message over
(checksum and all, so this path exercises the same validation as the network ones); the receiver
writes the pages into its blocks on that thread. `finish` ships the first token and the transfer
checksum; the receiver is then DONE. No receiver registered, or one that failed → the sender FAILS.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cluster.transfer.base import TransferError, TransferSpec
from cluster.transfer.registered import ReceiverRegistry, RegisteredReceiver
from cluster.transfer.sender_core import FinalMsg, LayerMsg, Message, QueuedSender


class LocalChannel(ReceiverRegistry):
    """transfer_id -> the receiver waiting for it, within one process."""


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


class LocalKVReceiver(RegisteredReceiver):
    def __init__(self, spec: TransferSpec, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 dest_block_ids: list[int], channel: LocalChannel | None = None) -> None:
        super().__init__(spec, k_caches, v_caches, dest_block_ids, channel or DEFAULT_CHANNEL)
