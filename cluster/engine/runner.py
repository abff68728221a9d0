"""ModelRunner: turns a SchedulerOutput into one forward pass and the sampled tokens.

Per step it lays the scheduled requests out as one flattened varlen batch (decodes first, then
prefill chunks), builds the attention metadata from the block tables, runs the model, computes logits
only for the rows that sample (the last token of every request whose known tokens are now all
computed), and hands those rows to the sampler. `forward` is the part every rank of a tensor-parallel
replica runs (cluster/parallel): rank 0 lays the batch out and samples, the others get the batch from it.
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
class HostBatch:
    """One step's flattened batch as host tensors, model inputs only: what TP rank 0 broadcasts."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    num_decodes: int  # the first num_decodes sequences have one new token each
    query_lens: list[int]  # [B]
    seq_lens: list[int]  # [B]
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    slot_mapping: torch.Tensor  # [T] int64
    sample_rows: list[int]  # [S] row of the last token of each sampling request


class ModelRunner:
    def __init__(self, model: torch.nn.Module, attn_backend, sampler: Sampler | None, device: torch.device) -> None:
        self.model = model
        self.attn = attn_backend
        self.sampler = sampler  # None on TP ranks > 0, which never sample
        self.device = device
        self.block_size = attn_backend.block_size

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        batch, sampling_requests = self._prepare(scheduled)
        logits = self.forward(batch)  # [S, vocab] float32
        if logits is None:
            return RunnerOutput({}, {})
        sampled = self.sampler(logits, sampling_requests)
        token_ids = {r.request_id: t for r, t in zip(sampling_requests, sampled.token_ids, strict=True)}
        logprobs = {
            r.request_id: lp
            for r, lp in zip(sampling_requests, sampled.logprobs, strict=True)
            if lp is not None
        }
        return RunnerOutput(token_ids, logprobs)

    @torch.inference_mode()
    def forward(self, batch: HostBatch) -> torch.Tensor | None:
        """The forward pass, then the logits of the sampling rows ([S, vocab] float32; None if S = 0).

        Every rank of a TP replica runs this on the same batch: the layers' collectives pair up."""
        device = self.device
        meta = AttentionMetadata.build(
            num_decodes=batch.num_decodes,
            query_lens=batch.query_lens,
            seq_lens=batch.seq_lens,
            block_tables=batch.block_tables,
            slot_mapping=batch.slot_mapping,
            device=device,
        )
        hidden = self.model(batch.input_ids.to(device), batch.positions.to(device), self.attn, meta)  # [T, hidden]
        if not batch.sample_rows:
            return None
        rows = torch.tensor(batch.sample_rows, device=device)
        return self.model.compute_logits(hidden.index_select(0, rows))

    def _prepare(self, scheduled: SchedulerOutput) -> tuple[HostBatch, list[Request]]:
        """The step's batch, and the requests that sample (in sample-row order)."""
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
        batch = HostBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            num_decodes=num_decodes,
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=block_tables,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            sample_rows=sample_rows,
        )
        return batch, sampling_requests
