"""Rank 0 of a TP replica: the engine's runner and KV-transfer coordinator, mirrored on every rank.

The LLMEngine on rank 0 is the whole engine (scheduler, KV manager, sampler, detokenizer); these two
replace its ModelRunner and KVTransferCoordinator when `tp.size > 1`. One engine step, across ranks:

    rank 0                                            ranks > 0 (follower.py)
    step(): poll receivers ─ POLL plan ─────────────▶ poll theirs
            all-reduce MIN of the states ◀──────────▶ (same), drop DONE/FAILED on every rank
            schedule
            begin_step: stage this step's KV sends
            runner.execute: lay out the batch
              ─ STEP plan (batch + sends) ───────────▶ set up their sends
              forward + compute_logits ◀── collectives ─▶ forward + compute_logits
              sample
            end_step: ─ first tokens ────────────────▶ finish their senders
            scheduler update, detokenize

Adding or aborting a sender or receiver is a CONTROL plan sent at once (from the engine thread, like
everything here), so a follower's receiver exists before the router can hand its address to a prefill
worker, and an aborted receiver stops writing before its blocks can be handed to another request.
Transfers are named on the wire by integer handles, not request ids.
"""

from __future__ import annotations

import itertools
import logging

import torch

from cluster.engine.kv_transfer import KVTransferCoordinator
from cluster.engine.runner import HostBatch, ModelRunner
from cluster.engine.sampler import Sampler
from cluster.engine.scheduler import SchedulerOutput
from cluster.parallel.plan import PlanChannel, PlanKind, StepPlan
from cluster.parallel.routed import RoutedReceiver, RoutedSender
from cluster.parallel.state import TPContext
from cluster.transfer import KVPoll, KVReceiver, KVSender

logger = logging.getLogger(__name__)

NUM_STATS = 3  # per follower: live senders, live receivers, transfers registered with its KV endpoint


class TPKVTransferCoordinator(KVTransferCoordinator):
    def __init__(self, attn_backend, channel: PlanChannel) -> None:
        super().__init__(attn_backend)
        self.channel = channel
        self._handles: dict[str, int] = {}  # request id -> handle of its sender or receiver
        self._next_handle = itertools.count(1)
        self._staged: list[tuple[int, torch.Tensor]] = []  # this step's sends: (handle, block ids on the host)

    # ---- prefill side ----
    def add_sender(self, request_id: str, sender: KVSender, first_block_index: int) -> None:
        if not isinstance(sender, RoutedSender):
            raise TypeError("a TP replica needs a RoutedSender (make_rank_sender), so every rank sends its heads")
        handle = next(self._next_handle)
        op = {"op": "add_sender", "handle": handle, "destination": sender.destination.to_dict()}
        if not self._control([op])[0]:
            # Rank 0's part still goes out; the decode side sees the missing part fail and prefills itself.
            logger.error("a TP rank could not create its KV senders for %s", request_id)
        super().add_sender(request_id, sender, first_block_index)
        self._handles[request_id] = handle

    def begin_step(self, scheduled: SchedulerOutput) -> None:
        super().begin_step(scheduled)
        self._staged = [(self._handles[rid], blocks.cpu()) for rid, _, blocks in self._step_sends]

    def take_step_sends(self) -> list[tuple[int, torch.Tensor]]:
        """The runner puts these in the STEP plan: the followers send the same blocks of their heads."""
        staged, self._staged = self._staged, []
        return staged

    def end_step(self, sampled_token_ids: dict[str, int]) -> None:
        if self._step_sends:
            tokens = [sampled_token_ids[rid] for rid, _, _ in self._step_sends]
            self.channel.broadcast_ints(tokens, len(tokens))
            for rid, _, _ in self._step_sends:
                del self._handles[rid]
        super().end_step(sampled_token_ids)

    def abort_sender(self, request_id: str) -> None:
        if request_id in self.senders:
            self._control([{"op": "abort_sender", "handle": self._handles.pop(request_id)}])
        super().abort_sender(request_id)

    # ---- decode side ----
    def add_receiver(self, request_id: str, receiver: KVReceiver) -> None:
        if not isinstance(receiver, RoutedReceiver):
            raise TypeError("a TP replica needs a RoutedReceiver (make_rank_receiver), so every rank receives its heads")
        handle = next(self._next_handle)
        op = {"op": "add_receiver", "handle": handle, "destination": receiver.destination.to_dict(),
              "block_ids": receiver.block_ids}
        if not self._control([op])[0]:
            # Fail it here too: the next poll reports FAILED on every rank and the prompt is prefilled locally.
            logger.error("a TP rank could not create its KV receivers for %s; falling back", request_id)
            receiver.abort()
        super().add_receiver(request_id, receiver)
        self._handles[request_id] = handle

    def poll_receivers(self) -> tuple[list[tuple[str, int]], list[str]]:
        request_ids = list(self.receivers)
        self.channel.send(StepPlan(PlanKind.POLL, handles=[self._handles[r] for r in request_ids]))
        states = self.channel.all_reduce_min([int(self.receivers[r].poll()) for r in request_ids])
        arrived, failed = [], []
        for request_id, state in zip(request_ids, states, strict=True):
            if state == KVPoll.DONE:  # DONE everywhere, rank 0 included: its receiver has the token
                arrived.append((request_id, self.receivers[request_id].first_token_id))
            elif state == KVPoll.FAILED:
                failed.append(request_id)
                self.num_fallbacks += 1
            else:
                continue
            self.receivers.pop(request_id).close()
            del self._handles[request_id]
        return arrived, failed

    def abort_receiver(self, request_id: str) -> None:
        if request_id in self.receivers:
            self._control([{"op": "abort_receiver", "handle": self._handles.pop(request_id)}])
        super().abort_receiver(request_id)

    # ---- helpers ----
    def _control(self, ops: list[dict]) -> list[int]:
        """Apply ops on every follower; per op, 1 if every rank managed it."""
        self.channel.send(StepPlan(PlanKind.CONTROL, control=ops))
        return self.channel.all_reduce_min([1] * len(ops))

    def follower_stats(self) -> torch.Tensor:
        """[size, NUM_STATS]: each follower's row (rank 0's is zeros)."""
        self.channel.send(StepPlan(PlanKind.STATS))
        return self.channel.all_reduce_sum(torch.zeros(self.channel.group.size, NUM_STATS, dtype=torch.int64))


class TPModelRunner(ModelRunner):
    """ModelRunner whose forward first tells the other ranks to run the same one."""

    def __init__(self, model: torch.nn.Module, attn_backend, sampler: Sampler, device: torch.device,
                 channel: PlanChannel, transfers: TPKVTransferCoordinator) -> None:
        super().__init__(model, attn_backend, sampler, device)
        self.channel = channel
        self.transfers = transfers

    def forward(self, batch: HostBatch) -> torch.Tensor | None:
        self.channel.send(StepPlan(PlanKind.STEP, batch=batch, sends=self.transfers.take_step_sends()))
        return super().forward(batch)


def make_rank0_components(engine, tp: TPContext) -> tuple[TPModelRunner, TPKVTransferCoordinator]:
    """The runner and transfer coordinator of a TP replica's rank-0 engine, sharing one plan channel."""
    channel = PlanChannel(tp.control)
    transfers = TPKVTransferCoordinator(engine.attn, channel)
    return TPModelRunner(engine.model, engine.attn, engine.sampler, engine.device, channel, transfers), transfers
