"""KVTransferCoordinator: the engine's end of moving a prompt's KV between a prefill and a decode engine.

Prefill side: a request added with a `KVSender` is computed like any other, but in the step where its
prompt completes, every layer's pages are handed to the sender the moment the attention backend has
written that layer (so the transfer of layer i overlaps the compute of layer i+1); after the step the
sender's `finish` carries the first sampled token. The request then ends here (max_tokens = 1) and its
blocks stay in this worker's prefix cache.

Decode side: a request reserved with `Scheduler.reserve_for_remote_kv` waits with a `KVReceiver`
attached. Each step starts by polling receivers: DONE → the request joins the running batch with the
prefill's first token; FAILED (lease expiry, checksum mismatch, sender gone) → it is prefilled here
instead, and `num_fallbacks` counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cluster.engine.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from cluster.transfer.base import KVReceiver, KVSender


@dataclass
class _PendingSend:
    sender: KVSender
    first_block_index: int  # blocks before this one are already on the decode worker


class KVTransferCoordinator:
    def __init__(self, attn_backend) -> None:
        self.attn = attn_backend
        self.senders: dict[str, _PendingSend] = {}
        self.receivers: dict[str, KVReceiver] = {}
        self.num_fallbacks = 0
        self.num_bytes_received = 0  # KV page bytes of completed incoming transfers (this rank's pieces)
        self._step_sends: list[tuple[str, KVSender, torch.Tensor]] = []
        attn_backend.layer_listener = self._on_layer_written

    # ---- prefill side ----
    def add_sender(self, request_id: str, sender: KVSender, first_block_index: int) -> None:
        self.senders[request_id] = _PendingSend(sender, first_block_index)

    def begin_step(self, scheduled: SchedulerOutput) -> None:
        """Note which requests finish their prompt this step: their layers are sent as they are written."""
        self._step_sends = []
        if not self.senders:
            return
        for request, num_new, block_ids in zip(
            scheduled.requests, scheduled.num_new_tokens, scheduled.block_ids, strict=True
        ):
            pending = self.senders.get(request.request_id)
            if pending is not None and request.num_computed_tokens + num_new == request.num_tokens:
                blocks = torch.tensor(block_ids[pending.first_block_index :], dtype=torch.int64)
                self._step_sends.append((request.request_id, pending.sender, blocks.to(self.attn.k_caches[0].device)))

    def _on_layer_written(self, layer_idx: int) -> None:
        for _, sender, blocks in self._step_sends:
            sender.send_layer_blocks(layer_idx, self.attn.k_caches[layer_idx], self.attn.v_caches[layer_idx], blocks)

    def end_step(self, sampled_token_ids: dict[str, int]) -> None:
        for request_id, sender, _ in self._step_sends:
            sender.finish(sampled_token_ids[request_id])
            del self.senders[request_id]
        self._step_sends = []

    def abort_sender(self, request_id: str) -> None:
        pending = self.senders.pop(request_id, None)
        if pending is not None:
            pending.sender.abort()

    # ---- decode side ----
    def add_receiver(self, request_id: str, receiver: KVReceiver) -> None:
        self.receivers[request_id] = receiver

    def poll_receivers(self) -> tuple[list[tuple[str, int]], list[str]]:
        """(request id, first token) of the transfers that completed, and the ids of those that failed."""
        from cluster.transfer.base import KVPoll

        arrived, failed = [], []
        for request_id, receiver in list(self.receivers.items()):
            state = receiver.poll()
            if state == KVPoll.DONE:
                arrived.append((request_id, receiver.first_token_id))
                self.num_bytes_received += receiver.nbytes
            elif state == KVPoll.FAILED:
                failed.append(request_id)
                self.num_fallbacks += 1
            else:
                continue
            receiver.close()
            del self.receivers[request_id]
        return arrived, failed

    def abort_receiver(self, request_id: str) -> None:
        receiver = self.receivers.pop(request_id, None)
        if receiver is not None:
            receiver.abort()
            receiver.close()

    @property
    def has_pending(self) -> bool:
        return bool(self.receivers)
