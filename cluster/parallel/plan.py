"""StepPlan: what TP rank 0 tells the other ranks, as two int64 tensors (never pickle), and the channel.

Every message is a broadcast of a fixed-size header (kind, sequence number, section sizes), then, when
the header says there is one, a broadcast of the payload: one flat int64 tensor whose sections the
header sizes. The kinds, and what the followers do with each:

    STEP     run the forward (+ compute_logits when rows sample) on `batch`; send `sends`' blocks as
             each layer is written, then take the first tokens rank 0 broadcasts after sampling
    POLL     poll the receivers `handles`, all-reduce MIN of the states, drop DONE/FAILED ones
    CONTROL  apply `control` ops (JSON, carried as bytes in the payload: add/abort a sender or
             receiver), all-reduce MIN of a per-op ok flag
    STATS    all-reduce SUM of a [size, NUM_STATS] table, each rank filling its row (leak checks)
    STOP     leave the loop

Payload layout (int64): input_ids [T] | positions [T] | query_lens [B] | seq_lens [B] |
block_tables [B * M] | slot_mapping [T] | sample_rows [S] | sends (handle, n, n block ids)* |
handles [H] | control bytes, zero-padded to 8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import torch
from torch.distributed import ReduceOp

from cluster.engine.runner import HostBatch
from cluster.parallel.state import TPGroup

HEADER_LEN = 12
_H_KIND, _H_SEQ, _H_T, _H_B, _H_DECODES, _H_M, _H_S, _H_SENDS, _H_HANDLES, _H_BYTES, _H_PAYLOAD, _H_MAGIC = range(12)
MAGIC = 0x53504D44  # "SPMD": a header that lacks it means the ranks fell out of step


class PlanKind(IntEnum):
    STEP = 1
    POLL = 2
    CONTROL = 3
    STATS = 4
    STOP = 5


@dataclass
class StepPlan:
    kind: PlanKind
    batch: HostBatch | None = None  # STEP
    sends: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # STEP: (transfer handle, block ids [n])
    handles: list[int] = field(default_factory=list)  # POLL: receivers to poll, in order
    control: list[dict[str, Any]] = field(default_factory=list)  # CONTROL: ops, applied in order
    seq: int = 0  # set by the channel


def _ints(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def encode(plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(header [HEADER_LEN], payload [n]) int64 tensors."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    parts: list[torch.Tensor] = []
    b = plan.batch
    if b is not None:
        num_seqs, max_blocks = b.block_tables.shape
        header[_H_T], header[_H_B], header[_H_DECODES] = b.input_ids.numel(), num_seqs, b.num_decodes
        header[_H_M], header[_H_S] = max_blocks, len(b.sample_rows)
        parts += [b.input_ids, b.positions, _ints(b.query_lens), _ints(b.seq_lens),
                  b.block_tables.reshape(-1), b.slot_mapping, _ints(b.sample_rows)]
    if plan.sends:
        sends = []
        for handle, blocks in plan.sends:
            sends += [_ints([handle, blocks.numel()]), blocks.to(torch.int64)]
        parts += sends
        header[_H_SENDS] = sum(p.numel() for p in sends)
    if plan.handles:
        parts.append(_ints(plan.handles))
        header[_H_HANDLES] = len(plan.handles)
    if plan.control:
        raw = json.dumps(plan.control).encode()
        padded = raw + b"\0" * (-len(raw) % 8)
        parts.append(torch.from_numpy(np.frombuffer(padded, dtype=np.int64).copy()))
        header[_H_BYTES] = len(raw)
    payload = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    header[_H_KIND], header[_H_SEQ], header[_H_PAYLOAD], header[_H_MAGIC] = plan.kind, plan.seq, payload.numel(), MAGIC
    return header, payload


def payload_len(header: torch.Tensor) -> int:
    if int(header[_H_MAGIC]) != MAGIC:
        raise RuntimeError(f"corrupt step-plan header {header.tolist()}: the TP ranks are out of step")
    return int(header[_H_PAYLOAD])


def decode(header: torch.Tensor, payload: torch.Tensor) -> StepPlan:
    h = header.tolist()
    plan = StepPlan(PlanKind(h[_H_KIND]), seq=h[_H_SEQ])
    pos = 0

    def take(n: int) -> torch.Tensor:
        nonlocal pos
        pos += n
        return payload[pos - n : pos]

    num_tokens, num_seqs = h[_H_T], h[_H_B]
    if plan.kind == PlanKind.STEP:
        input_ids, positions = take(num_tokens), take(num_tokens)
        query_lens, seq_lens = take(num_seqs).tolist(), take(num_seqs).tolist()
        block_tables = take(num_seqs * h[_H_M]).view(num_seqs, h[_H_M])
        plan.batch = HostBatch(input_ids, positions, h[_H_DECODES], query_lens, seq_lens, block_tables,
                               take(num_tokens), take(h[_H_S]).tolist())
    end = pos + h[_H_SENDS]
    while pos < end:
        handle, n = take(2).tolist()
        plan.sends.append((handle, take(n)))
    plan.handles = take(h[_H_HANDLES]).tolist()
    if h[_H_BYTES]:
        raw = take(-(-h[_H_BYTES] // 8)).numpy().tobytes()[: h[_H_BYTES]]
        plan.control = json.loads(raw)
    return plan


class PlanChannel:
    """Rank 0 `send`s plans, the others `recv` them, in lockstep over the replica's control group."""

    def __init__(self, group: TPGroup) -> None:
        self.group = group
        self._seq = 0
        self.closed = False

    def send(self, plan: StepPlan) -> None:
        if self.closed:
            raise RuntimeError("this TP replica has been shut down")
        self._seq += 1
        plan.seq = self._seq
        header, payload = encode(plan)
        self.group.broadcast(header)
        if payload.numel():
            self.group.broadcast(payload)
        if plan.kind == PlanKind.STOP:
            self.closed = True

    def recv(self) -> StepPlan:
        header = self.group.broadcast(torch.zeros(HEADER_LEN, dtype=torch.int64))
        n = payload_len(header)
        payload = self.group.broadcast(torch.empty(n, dtype=torch.int64)) if n else torch.empty(0, dtype=torch.int64)
        plan = decode(header, payload)
        self._seq += 1
        if plan.seq != self._seq:
            raise RuntimeError(f"step plan {plan.seq} arrived, {self._seq} expected: the TP ranks are out of step")
        return plan

    def broadcast_ints(self, values: list[int] | None, n: int) -> list[int]:
        """Rank 0 passes `n` values, the others None: everyone gets them (the first tokens after a STEP)."""
        t = _ints(values) if values is not None else torch.empty(n, dtype=torch.int64)
        return self.group.broadcast(t).tolist()

    def all_reduce_min(self, values: list[int]) -> list[int]:
        return self.group.all_reduce(_ints(values), ReduceOp.MIN).tolist()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(t)
