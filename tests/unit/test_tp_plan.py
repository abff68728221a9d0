"""StepPlan wire format: every kind survives encode → decode as plain int64 tensors."""

from __future__ import annotations

import torch

from cluster.engine.runner import HostBatch
from cluster.parallel.plan import HEADER_LEN, PlanKind, StepPlan, decode, encode


def test_step_plan_round_trip():
    batch = HostBatch(
        input_ids=torch.tensor([5, 6, 7, 8, 9]), positions=torch.tensor([3, 0, 1, 2, 7]), num_decodes=1,
        query_lens=[1, 3, 1], seq_lens=[4, 3, 8], block_tables=torch.tensor([[1, 0], [2, 0], [3, 4]]),
        slot_mapping=torch.tensor([19, 32, 33, 34, 71]), sample_rows=[0, 3, 4],
    )
    sends = [(7, torch.tensor([2, 5])), (9, torch.tensor([4]))]
    header, payload = encode(StepPlan(PlanKind.STEP, batch=batch, sends=sends, seq=42))
    assert header.shape == (HEADER_LEN,) and header.dtype == payload.dtype == torch.int64
    plan = decode(header, payload)
    assert (plan.kind, plan.seq) == (PlanKind.STEP, 42)
    got = plan.batch
    for name in ("input_ids", "positions", "block_tables", "slot_mapping"):
        assert torch.equal(getattr(got, name), getattr(batch, name)), name
    assert (got.num_decodes, got.query_lens, got.seq_lens, got.sample_rows) == (1, [1, 3, 1], [4, 3, 8], [0, 3, 4])
    assert [(h, b.tolist()) for h, b in plan.sends] == [(7, [2, 5]), (9, [4])]


def test_step_without_sampling_rows_and_control_round_trip():
    batch = HostBatch(torch.tensor([1, 2]), torch.tensor([0, 1]), 0, [2], [2], torch.tensor([[3]]),
                      torch.tensor([48, 49]), [])
    plan = decode(*encode(StepPlan(PlanKind.STEP, batch=batch)))
    assert plan.batch.sample_rows == [] and plan.sends == []
    ops = [{"op": "add_receiver", "handle": 3, "destination": {"transport": "grpc", "targets": [[0, "h:1", "x@d0", 0, 1]]},
            "block_ids": [4, 5]}, {"op": "abort_sender", "handle": 1}]
    plan = decode(*encode(StepPlan(PlanKind.CONTROL, control=ops)))
    assert plan.kind == PlanKind.CONTROL and plan.control == ops
    assert decode(*encode(StepPlan(PlanKind.POLL, handles=[4, 1, 9]))).handles == [4, 1, 9]
    header, payload = encode(StepPlan(PlanKind.STOP))
    assert payload.numel() == 0 and decode(header, payload).kind == PlanKind.STOP
