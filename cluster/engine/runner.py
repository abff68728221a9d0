"""ModelRunner: turns a SchedulerOutput into one forward pass and the sampled tokens.

Per step it lays the scheduled requests out as one flattened varlen batch (decodes first, then
prefill chunks), builds the attention metadata from the block tables, runs the model, computes logits
only for the rows that sample (the last token of every request whose known tokens are now all
computed), and hands those rows to the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.attention.metadata import AttentionMetadata
from cluster.engine.sampler import Sampler, TokenLogprobs
from cluster.engine.scheduler import SchedulerOutput
from cluster.request import Request


@dataclass
class RunnerOutput:
    sampled_token_ids: dict[str, int]  # request id -> token, for requests that sampled this step
    logprobs: dict[str, TokenLogprobs]  # request id -> logprobs, for sampled requests that asked


@dataclass
class _Batch:
    requests: list[Request]  # in batch order: decodes first
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: list[int]  # row of the last token of each sampling request
    sampling_requests: list[Request]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, attn_backend, sampler: Sampler, device: torch.device) -> None:
        self.model = model
        self.attn = attn_backend
        self.sampler = sampler
        self.device = device
        self.block_size = attn_backend.block_size

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        batch = self._prepare(scheduled)
        hidden = self.model(batch.input_ids, batch.positions, self.attn, batch.meta)  # [T, hidden]
        if not batch.sample_rows:
            return RunnerOutput({}, {})
        rows = torch.tensor(batch.sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))  # [S, vocab] float32
        sampled = self.sampler(logits, batch.sampling_requests)
        token_ids = {r.request_id: t for r, t in zip(batch.sampling_requests, sampled.token_ids, strict=True)}
        logprobs = {
            r.request_id: lp
            for r, lp in zip(batch.sampling_requests, sampled.logprobs, strict=True)
            if lp is not None
        }
        return RunnerOutput(token_ids, logprobs)

    def _prepare(self, scheduled: SchedulerOutput) -> _Batch:
        block_size = self.block_size
        entries = list(zip(scheduled.requests, scheduled.num_new_tokens, scheduled.block_ids, strict=True))
        # Decodes first: the attention backend batches them in one call.
        entries.sort(key=lambda e: e[1] != 1)
        num_decodes = sum(1 for e in entries if e[1] == 1)

        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sampling_requests: list[Request] = []
        for request, num_new, block_ids in entries:
            start = request.num_computed_tokens
            end = start + num_new
            if num_new == 1:
                input_ids.append(request.all_token_ids[start])
                positions.append(start)
                slots.append(block_ids[start // block_size] * block_size + start % block_size)
            else:
                input_ids.extend(request.all_token_ids[start:end])
                span = range(start, end)
                positions.extend(span)
                slots.extend(block_ids[p // block_size] * block_size + p % block_size for p in span)
            query_lens.append(num_new)
            seq_lens.append(end)
            if end == request.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sampling_requests.append(request)

        max_blocks = max(len(e[2]) for e in entries)
        block_tables = torch.tensor([e[2] + [0] * (max_blocks - len(e[2])) for e in entries], dtype=torch.int64)
        meta = AttentionMetadata.build(
            num_decodes=num_decodes,
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=block_tables,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            device=self.device,
        )
        return _Batch(
            requests=[e[0] for e in entries],
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=self.device),
            positions=torch.tensor(positions, dtype=torch.int64, device=self.device),
            meta=meta,
            sample_rows=sample_rows,
            sampling_requests=sampling_requests,
        )
