"""LLMEngine: the single-process engine every worker role drives (add_request / step / abort).

A request's life here:
1. `add_request` validates the prompt and sampling params (ValueError naming the field), tokenizes a
   text prompt, and queues one `Request` per choice. With n > 1 only the first choice is queued at
   first; the others follow once its prompt is computed, so they find the prompt's full blocks in the
   prefix cache instead of recomputing them.
2. `step` = schedule (which requests compute how many tokens, with chunked prefill and preemption)
   → one forward pass and sampling (ModelRunner) → scheduler update (append tokens, stop on EOS,
   stop ids, length) → incremental detokenization (text deltas, stop strings).
3. Finished requests free their KV blocks into the prefix cache; `abort` does the same at any time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

from cluster.attention.selector import create_attention_backend
from cluster.config import EngineConfig
from cluster.engine.detokenizer import IncrementalDetokenizer
from cluster.engine.kv_transfer import KVTransferCoordinator
from cluster.engine.outputs import RequestOutput
from cluster.engine.runner import ModelRunner
from cluster.engine.sampler import Sampler
from cluster.engine.scheduler import RemoteKVReservation, Scheduler
from cluster.kv.manager import KVCacheManager
from cluster.model.loader import load_model
from cluster.model.tokenizer import Tokenizer
from cluster.parallel.state import TPContext
from cluster.request import FinishReason, Request, SamplingParams

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLMEngine:
    def __init__(self, model_dir: str, config: EngineConfig | None = None, tp: TPContext | None = None) -> None:
        """`tp`: this process is rank 0 of a tensor-parallel replica (see cluster.parallel.launch_tp_engine)."""
        self.config = config = config or EngineConfig()
        self.tp = tp
        if (tp.size if tp else 1) != config.tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} needs a TP group of that size "
                             "(start the replica with cluster.parallel.launch_tp_engine)")
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        self.dtype = _resolve_dtype(config.dtype, self.device)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.model, self.arch = load_model(model_dir, self.dtype, self.device, tp.model if tp else None)
        self.model.eval()
        self.num_kv_heads = self.model.num_kv_heads_per_rank  # with TP each rank caches only its heads
        self.max_model_len = min(config.max_model_len or self.arch.max_position_embeddings,
                                 self.arch.max_position_embeddings)
        self.eos_token_ids = tuple(self.arch.eos_token_ids or self.tokenizer.eos_token_ids)

        self.num_kv_blocks = config.num_kv_blocks or self._blocks_for_memory(config.kv_cache_memory_gib)
        self.attn = create_attention_backend(
            config.attention_backend,
            num_layers=self.arch.num_layers,
            num_blocks=self.num_kv_blocks,
            block_size=config.block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.arch.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.kv_manager = KVCacheManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv_manager, self.max_model_len)
        self.sampler = Sampler(seed=config.seed)
        if tp is None or tp.size == 1:
            self.runner = ModelRunner(self.model, self.attn, self.sampler, self.device)
            self.transfers = KVTransferCoordinator(self.attn)
        else:  # every forward and KV transfer is mirrored on the other ranks (imported here: TP=1 never needs it)
            from cluster.parallel.rank0 import make_rank0_components

            self.runner, self.transfers = make_rank0_components(self, tp)

        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._parents: dict[str, tuple[str, int]] = {}  # internal id -> (caller's id, choice index)
        self._pending_choices: dict[str, list[Request]] = {}  # first choice's id -> choices waiting for it
        self._num_open: dict[str, int] = {}  # caller's id -> choices not finished yet

    # ----------------------------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        kv_sender=None,
        first_block_index: int = 0,
    ) -> list[int]:
        """Queue a prompt; returns its token ids. Raises ValueError naming the bad field.

        With `kv_sender` this is the prefill side of a disaggregated request: only the first token is
        sampled here, and the prompt's KV from block `first_block_index` on goes to the sender.
        """
        params = params or SamplingParams()
        if request_id in self._num_open:
            raise ValueError(f"request_id {request_id!r} is already running")
        if kv_sender is not None:
            if params.n != 1:
                raise ValueError("n must be 1 for a disaggregated request (each choice is its own request)")
            params = dataclasses.replace(params, max_tokens=1, min_tokens=0)
        prompt_ids = self._validate_prompt(prompt)
        choices = []
        for index in range(params.n):
            choice_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + index
                choice_params = dataclasses.replace(params, n=1, seed=seed)
            internal_id = request_id if params.n == 1 else f"{request_id}#{index}"
            choices.append(Request(internal_id, prompt_ids, choice_params, self.eos_token_ids, priority))
        self.scheduler.add_request(choices[0])  # raises before we record anything if it can never run
        if kv_sender is not None:
            self.transfers.add_sender(request_id, kv_sender, first_block_index)
        self._register(request_id, choices)
        if len(choices) > 1:
            self._pending_choices[choices[0].request_id] = choices[1:]
        return prompt_ids

    def add_remote_kv_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        priority: int = 0,
    ) -> RemoteKVReservation | None:
        """Decode side of a disaggregated request: reserve blocks for the prompt's KV, which a prefill
        worker will send (`attach_kv_receiver`). None when the blocks don't fit right now."""
        if request_id in self._num_open:
            raise ValueError(f"request_id {request_id!r} is already running")
        if params.n != 1:
            raise ValueError("n must be 1 for a disaggregated request (each choice is its own request)")
        prompt_ids = self._validate_prompt(prompt_token_ids)
        request = Request(request_id, prompt_ids, params, self.eos_token_ids, priority)
        reservation = self.scheduler.reserve_for_remote_kv(request)
        if reservation is not None:
            self._register(request_id, [request])
        return reservation

    def attach_kv_receiver(self, request_id: str, receiver) -> None:
        self.transfers.add_receiver(request_id, receiver)

    def _register(self, request_id: str, choices: list[Request]) -> None:
        prompt_ids = choices[0].prompt_token_ids
        for index, choice in enumerate(choices):
            self._parents[choice.request_id] = (request_id, index)
            self._detokenizers[choice.request_id] = IncrementalDetokenizer(
                self.tokenizer.backend, prompt_ids, stop=choice.sampling_params.stop
            )
        self._num_open[request_id] = len(choices)

    def abort(self, request_id: str) -> None:
        """Cancel every choice of a caller's request; its blocks go back to the pool."""
        internal_ids = [i for i, (parent, _) in self._parents.items() if parent == request_id]
        for internal_id in internal_ids:
            self.scheduler.abort_request(internal_id)
            self.transfers.abort_sender(internal_id)
            self.transfers.abort_receiver(internal_id)
            self._forget(internal_id)
        self._pending_choices.pop(internal_ids[0] if internal_ids else "", None)
        self._num_open.pop(request_id, None)

    def is_request_open(self, request_id: str) -> bool:
        """True while any choice of the caller's request is still queued, running or waiting for KV."""
        return request_id in self._num_open

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._pending_choices)

    @property
    def num_kv_transfer_fallbacks(self) -> int:
        return self.transfers.num_fallbacks

    @property
    def num_kv_bytes_received(self) -> int:
        """KV page bytes that arrived in completed transfers (on a TP replica: rank 0's pieces)."""
        return self.transfers.num_bytes_received

    # ----------------------------------------------------------------------------------- the step
    def step(self) -> list[RequestOutput]:
        outputs = self._admit_transferred()
        scheduled = self.scheduler.schedule()
        if not scheduled.requests:
            return outputs
        self.transfers.begin_step(scheduled)
        result = self.runner.execute(scheduled)
        self.transfers.end_step(result.sampled_token_ids)
        updated = self.scheduler.update(scheduled, result.sampled_token_ids)
        self._release_pending_choices(scheduled.requests)
        outputs += [self._make_output(request, result.logprobs.get(request.request_id)) for request in updated]
        return outputs

    def _admit_transferred(self) -> list[RequestOutput]:
        """Decode side: requests whose KV arrived start decoding; failed transfers prefill here."""
        if not self.transfers.has_pending:
            return []
        arrived, failed = self.transfers.poll_receivers()
        for request_id in failed:
            logger.warning("KV transfer for %s failed; computing its prefill locally", request_id)
            self.scheduler.fall_back_to_local_prefill(request_id)
        # The first token came from the prefill worker; emitting it keeps every token's stream in order.
        return [self._make_output(self.scheduler.complete_remote_kv(rid, token), None) for rid, token in arrived]

    def _make_output(self, request: Request, logprobs) -> RequestOutput:
        detok = self._detokenizers[request.request_id]
        new_token = request.output_token_ids[-1]
        text = detok.update([new_token])
        if not request.is_finished and detok.stop_string_hit is not None:
            self.scheduler.finish_request(request.request_id, FinishReason.STOP)
        if request.is_finished and detok.stop_string_hit is None:
            text += detok.finish()
        parent, index = self._parents[request.request_id]
        output = RequestOutput(
            request_id=parent,
            index=index,
            new_token_ids=[new_token],
            new_text=text,
            new_logprobs=[logprobs] if logprobs is not None else None,
            finished=request.is_finished,
            finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            is_kv_fallback=request.is_kv_fallback,
        )
        if request.is_finished:
            self._forget(request.request_id)
            self._num_open[parent] -= 1
            if self._num_open[parent] == 0:
                del self._num_open[parent]
        return output

    def _release_pending_choices(self, scheduled: list[Request]) -> None:
        for request in scheduled:
            waiting = self._pending_choices.get(request.request_id)
            if waiting and (request.num_computed_tokens >= request.num_prompt_tokens or request.is_finished):
                del self._pending_choices[request.request_id]
                for choice in waiting:
                    self.scheduler.add_request(choice)

    def _forget(self, internal_id: str) -> None:
        self._detokenizers.pop(internal_id, None)
        self._parents.pop(internal_id, None)
        self.sampler.release(internal_id)

    # ----------------------------------------------------------------------------------- helpers
    def _validate_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = list(prompt)
            if not all(isinstance(t, int) and 0 <= t < self.arch.vocab_size for t in prompt_ids):
                raise ValueError(f"prompt_token_ids must be integers in [0, {self.arch.vocab_size})")
        if not prompt_ids:
            raise ValueError("prompt must not be empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(prompt_ids)} tokens; the context is {self.max_model_len} "
                "and at least one token must be generated"
            )
        if -(-len(prompt_ids) // self.config.block_size) > self.num_kv_blocks:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens, more than the whole KV cache holds")
        return prompt_ids

    def _blocks_for_memory(self, gib: float) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        per_block = 2 * self.arch.num_layers * self.config.block_size * self.num_kv_heads
        per_block *= self.arch.head_dim * element_size
        return max(1, int(gib * 2**30) // per_block)

    @property
    def num_free_kv_blocks(self) -> int:
        return self.kv_manager.num_free_blocks


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 matmuls on CPUs without AVX512-BF16/AMX are several times slower than fp32; on CPUs with
        # them bf16 is several times faster (cluster/model/cpu_gemm.py), but auto stays one answer on
        # every CPU so that results do not change with the host: set bfloat16 there explicitly.
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return _DTYPES[name]
