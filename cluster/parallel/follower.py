"""Ranks > 0 of a TP replica: hold a model shard and a KV-cache slice, and do what rank 0's plans say.

A follower has no scheduler, KV manager or sampler: rank 0 owns every decision (which blocks, which
tokens). Its life:
1. `run_follower` (launch.py) joins the replica's groups, loads its shard of the model, sizes its attention backend
   for its KV heads and rank 0's block count, starts its own KV endpoint (decode side), and publishes
   that endpoint's address in the rendezvous store.
2. `follower_loop` (here) receives plans until STOP (see plan.py for the kinds). A STEP runs the forward and
   compute_logits exactly as rank 0 does (the collectives inside pair up); if the plan names KV sends,
   this rank's senders ship its head slice of those blocks as each layer is written, and are finished
   with the first tokens rank 0 broadcasts after sampling.
3. On STOP (or when rank 0 vanishes and the group breaks) it closes its transfers and endpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from cluster.engine.runner import ModelRunner
from cluster.parallel.destination import KVDestination
from cluster.parallel.kv_endpoint import KVEndpoint
from cluster.parallel.plan import PlanChannel, PlanKind
from cluster.parallel.rank0 import NUM_STATS
from cluster.parallel.routed import (
    KVGeometry,
    RoutedReceiver,
    RoutedSender,
    make_rank_receiver,
    make_rank_sender,
)
from cluster.transfer import KVPoll

logger = logging.getLogger(__name__)


class FollowerTransfers:
    """This rank's senders and receivers, by the handles rank 0 gave them."""

    def __init__(self, attn, geometry: KVGeometry, endpoint: KVEndpoint | None) -> None:
        self.attn = attn
        self.geometry = geometry
        self.endpoint = endpoint
        self.senders: dict[int, RoutedSender] = {}
        self.receivers: dict[int, RoutedReceiver] = {}
        self.finishing: list[RoutedSender] = []  # finished, still shipping; closed once DONE or FAILED
        self._step_sends: list[tuple[RoutedSender, torch.Tensor]] = []  # (sender, block ids) fed each layer
        self._step_senders: list[RoutedSender | None] = []
        attn.layer_listener = self._on_layer_written

    # ---- CONTROL ----
    def apply(self, ops: list[dict[str, Any]]) -> list[int]:
        """Apply each op; 1 where it worked. A failure is logged here; rank 0 decides what it means."""
        return [self._apply_one(op) for op in ops]

    def _apply_one(self, op: dict[str, Any]) -> int:
        handle = int(op["handle"])
        try:
            if op["op"] == "add_sender":
                self.senders[handle] = make_rank_sender(KVDestination.from_dict(op["destination"]), self.geometry)
            elif op["op"] == "add_receiver":
                kwargs = self.endpoint.receiver_kwargs() if self.endpoint is not None else {}
                self.receivers[handle] = make_rank_receiver(
                    KVDestination.from_dict(op["destination"]), self.geometry, self.attn.k_caches,
                    self.attn.v_caches, [int(b) for b in op["block_ids"]], **kwargs)
            elif op["op"] == "abort_sender":
                sender = self.senders.pop(handle, None)
                if sender is not None:
                    sender.abort()
                    sender.close()
            elif op["op"] == "abort_receiver":
                receiver = self.receivers.pop(handle, None)
                if receiver is not None:
                    receiver.abort()
                    receiver.close()
            else:
                raise ValueError(f"unknown op {op['op']!r}")
        except Exception:
            logger.exception("rank %d: %s for transfer handle %d failed", self.geometry.rank, op["op"], handle)
            return 0
        return 1

    # ---- POLL ----
    def poll(self, handles: list[int], channel: PlanChannel) -> None:
        # A handle we don't hold (its creation failed here) counts as FAILED, so the request falls back.
        local = [int(self.receivers[h].poll()) if h in self.receivers else int(KVPoll.FAILED) for h in handles]
        for handle, state in zip(handles, channel.all_reduce_min(local), strict=True):
            if state in (KVPoll.DONE, KVPoll.FAILED) and handle in self.receivers:
                self.receivers.pop(handle).close()

    # ---- STEP ----
    def begin_step(self, sends: list[tuple[int, torch.Tensor]]) -> None:
        """Before the forward: the senders whose blocks go out as this step writes each layer."""
        device = self.attn.k_caches[0].device
        self._step_senders = []  # per send, in plan order (None: we hold no sender for that handle)
        self._step_sends = []
        for handle, blocks in sends:
            sender = self.senders.pop(handle, None)
            if sender is None:
                logger.error("rank %d: no sender for transfer handle %d; its heads are not sent",
                             self.geometry.rank, handle)
            elif sender.parts:  # a rank that only replicates heads another rank sends has nothing to do
                self._step_sends.append((sender, blocks.to(device)))
            self._step_senders.append(sender)

    def _on_layer_written(self, layer_idx: int) -> None:
        for sender, blocks in self._step_sends:
            sender.send_layer_blocks(layer_idx, self.attn.k_caches[layer_idx], self.attn.v_caches[layer_idx], blocks)

    def end_step(self, first_tokens: list[int]) -> None:
        """After rank 0 sampled: the final message of each send carries the request's first token."""
        for sender, token in zip(self._step_senders, first_tokens, strict=True):
            if sender is not None:
                sender.finish(token)
                self.finishing.append(sender)
        self._step_senders, self._step_sends = [], []
        self.reap()

    def reap(self) -> None:
        """Close finished senders whose transfer is over (DONE or FAILED)."""
        still = []
        for sender in self.finishing:
            if sender.poll() in (KVPoll.DONE, KVPoll.FAILED):
                sender.close()
            else:
                still.append(sender)
        self.finishing = still

    def stats(self) -> list[int]:
        self.reap()
        registered = self.endpoint.num_registered() if self.endpoint is not None else 0
        return [len(self.senders) + len(self.finishing), len(self.receivers), registered]

    def close(self) -> None:
        for sender in [*self.senders.values(), *self.finishing]:
            sender.close()
        for receiver in self.receivers.values():
            receiver.close()
        self.senders.clear()
        self.receivers.clear()
        self.finishing = []


def follower_loop(channel: PlanChannel, runner: ModelRunner, transfers: FollowerTransfers) -> None:
    """Run rank 0's plans until STOP. `runner` is a plain ModelRunner without a sampler."""
    while True:
        plan = channel.recv()
        if plan.kind == PlanKind.STOP:
            return
        if plan.kind == PlanKind.STEP:
            transfers.begin_step(plan.sends)
            runner.forward(plan.batch)  # the logits are rank 0's business; computing them joins the all-gather
            if plan.sends:
                transfers.end_step(channel.broadcast_ints(None, len(plan.sends)))
        elif plan.kind == PlanKind.POLL:
            transfers.poll(plan.handles, channel)
        elif plan.kind == PlanKind.CONTROL:
            channel.all_reduce_min(transfers.apply(plan.control))
        elif plan.kind == PlanKind.STATS:
            table = torch.zeros(channel.group.size, NUM_STATS, dtype=torch.int64)
            table[channel.group.rank] = torch.tensor(transfers.stats())
            channel.all_reduce_sum(table)
