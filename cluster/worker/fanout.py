"""FanOutSender: one prefill rank's KV to several decode ranks, each getting its slice of KV heads."""

from __future__ import annotations

import torch

from cluster.transfer import KVPoll, KVSender, TransferSpec, combine


class FanOutSender(KVSender):
    def __init__(self, senders: list[tuple[TransferSpec, KVSender]]) -> None:
        self.senders = senders

    def send_layer(self, layer_idx: int, k_pages: torch.Tensor, v_pages: torch.Tensor) -> None:
        # pages: [num_blocks, block_size, num_kv_heads, head_dim]; each decode rank holds a head range
        for spec, sender in self.senders:
            heads = slice(spec.kv_head_start, spec.kv_head_end)
            sender.send_layer(layer_idx, k_pages[:, :, heads], v_pages[:, :, heads])

    def finish(self, first_token_id: int) -> None:
        for _, sender in self.senders:
            sender.finish(first_token_id)

    def poll(self) -> KVPoll:
        return combine(sender.poll() for _, sender in self.senders)

    def abort(self) -> None:
        for _, sender in self.senders:
            sender.abort()

    def close(self) -> None:
        for _, sender in self.senders:
            sender.close()
