"""Scheduler: token-centric continuous batching with chunked prefill, prefix caching and preemption.

Each step has a token budget. Running requests are served first, each with what it still lacks
(one token when decoding, a chunk when a prefill is unfinished); when the KV pool runs dry, the
lowest-priority running request is preempted (freed, recomputed later from the prefix cache).
Waiting requests are then admitted while budget, seats and blocks remain. There is no prefill or
decode phase: a step mixes both, as in vLLM v1.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from cluster.config import EngineConfig
from cluster.kv.manager import KVCacheManager, cdiv
from cluster.request import FinishReason, Request, RequestStatus


@dataclass
class SchedulerOutput:
    requests: list[Request] = field(default_factory=list)  # scheduled this step
    num_new_tokens: list[int] = field(default_factory=list)  # parallel: tokens to compute for each
    block_ids: list[list[int]] = field(default_factory=list)  # parallel: whole block table after allocation
    preempted: list[Request] = field(default_factory=list)  # preempted during this schedule call

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    def add(self, request: Request, num_new_tokens: int, block_ids: list[int]) -> None:
        self.requests.append(request)
        self.num_new_tokens.append(num_new_tokens)
        self.block_ids.append(block_ids)


@dataclass
class RemoteKVReservation:
    """Where a transfer must land: the request's blocks from `first_block_index` on (the ones before
    it were prefix-cache hits on this worker and are not sent)."""

    first_block_index: int
    block_ids: list[int]


def _priority_key(request: Request) -> tuple[int, float]:
    return request.priority, request.arrival_time


class Scheduler:
    def __init__(self, config: EngineConfig, kv_manager: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv_manager = kv_manager
        self.max_model_len = max_model_len
        self.is_priority = config.scheduling_policy == "priority"
        # Both queues are kept in service order: under "priority" sorted by (priority, arrival), so the
        # front of `waiting` is admitted next and the back of `running` is preempted first.
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.num_preemptions = 0  # since start: a sign the KV pool is too small for the load
        self.waiting_for_kv: dict[str, Request] = {}  # decode side: blocks reserved, KV arriving remotely

    # ---- queue management ----

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def add_request(self, request: Request) -> None:
        self._check_can_serve(request)
        self.requests[request.request_id] = request
        request.status = RequestStatus.WAITING
        self._enqueue_waiting(request)

    def abort_request(self, request_id: str) -> Request | None:
        return self.finish_request(request_id, FinishReason.ABORT)

    def finish_request(self, request_id: str, reason: FinishReason) -> Request | None:
        """Finish a waiting or running request from outside (abort, stop string). None if unknown."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING_FOR_KV:
            del self.waiting_for_kv[request_id]
        else:
            self.waiting.remove(request)
        self._finish(request, reason)
        return request

    # ---- the decode side of a disaggregated request ----

    def reserve_for_remote_kv(self, request: Request) -> RemoteKVReservation | None:
        """Hold blocks for a prompt whose KV a prefill worker will send; None if they don't fit now.

        Leading blocks found in the prefix cache are reused, so only the rest is transferred. The new
        blocks join the prefix cache only once their KV has landed (`complete_remote_kv`).
        """
        self._check_can_serve(request)
        computed_blocks, num_cached_tokens = self.kv_manager.get_computed_blocks(request)
        num_new_tokens = request.num_prompt_tokens - num_cached_tokens
        if self.kv_manager.allocate_slots(request, num_new_tokens, computed_blocks, defer_caching=True) is None:
            self.kv_manager.free(request)  # forget the hash chain the lookup started
            return None
        request.num_cached_tokens = request.num_computed_tokens = num_cached_tokens
        request.status = RequestStatus.WAITING_FOR_KV
        self.requests[request.request_id] = request
        self.waiting_for_kv[request.request_id] = request
        first_block_index = num_cached_tokens // self.kv_manager.block_size
        block_ids = self.kv_manager.get_block_ids(request.request_id)
        return RemoteKVReservation(first_block_index, block_ids[first_block_index:])

    def complete_remote_kv(self, request_id: str, first_token_id: int) -> Request:
        """The prompt's KV landed: count it computed, append the prefill's first token, start decoding."""
        request = self.waiting_for_kv.pop(request_id)
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv_manager.cache_blocks(request, request.num_prompt_tokens)
        request.append_output_token(first_token_id)
        reason = self._check_stop(request)
        if reason is not None:
            self._finish(request, reason)
        else:
            request.status = RequestStatus.RUNNING
            self._add_running(request)
        return request

    def fall_back_to_local_prefill(self, request_id: str) -> None:
        """The transfer failed: release the reservation and queue the prompt to be computed here."""
        request = self.waiting_for_kv.pop(request_id)
        self.kv_manager.free(request)
        request.is_kv_fallback = True
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self._enqueue_waiting(request, at_front=True)

    # ---- one step ----

    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts, allocating their KV blocks (preempting if needed)."""
        output = SchedulerOutput()
        budget = self._schedule_running(output, self.config.max_num_batched_tokens)
        # After a preemption the pool is under pressure: admitting new work would only thrash it.
        if not output.preempted:
            self._schedule_waiting(output, budget)
        return output

    def update(self, output: SchedulerOutput, sampled_token_ids: dict[str, int]) -> list[Request]:
        """Advance the scheduled requests by what was computed; append sampled tokens, check stops.

        Returns the requests that received a token this step, finished ones included.
        """
        with_new_token = []
        for request, num_new_tokens in zip(output.requests, output.num_new_tokens, strict=True):
            if request.is_finished:  # aborted between schedule() and update()
                continue
            request.num_computed_tokens += num_new_tokens
            reached_end = request.num_computed_tokens == request.num_tokens
            token_id = sampled_token_ids.get(request.request_id)
            if reached_end != (token_id is not None):
                raise ValueError(f"{request.request_id}: sampled token must be given iff its prefill/decode "
                                 f"reached the end (computed={request.num_computed_tokens}/{request.num_tokens})")
            if token_id is None:
                continue  # a prefill chunk that did not reach the end
            request.append_output_token(token_id)
            reason = self._check_stop(request)
            if reason is not None:
                self.running.remove(request)
                self._finish(request, reason)
            with_new_token.append(request)
        return with_new_token

    # ---- helpers ----

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        """Give each running request, in order, what it lacks, preempting from the back when out of blocks."""
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new_tokens > 0:
                if not self._allocate_or_preempt(request, num_new_tokens, output):
                    break  # the request preempted itself: it was the last one running
                output.add(request, num_new_tokens, self.kv_manager.get_block_ids(request.request_id))
                budget -= num_new_tokens
            i += 1
        return budget

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int, output: SchedulerOutput) -> bool:
        """Allocate for `request`, preempting the back of `running` until it fits. False if it was itself."""
        while self.kv_manager.allocate_slots(request, num_new_tokens) is None:
            victim = self.running.pop()
            self._preempt(victim)
            output.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        """Admit waiting requests in service order until budget, seats or blocks run out."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_cached_tokens = self.kv_manager.get_computed_blocks(request)
            num_new_tokens = min(request.num_tokens - num_cached_tokens, budget)
            if self.kv_manager.allocate_slots(request, num_new_tokens, computed_blocks) is None:
                break  # head-of-line blocking keeps the order fair; running requests are never preempted here
            self.waiting.popleft()
            if request.status == RequestStatus.WAITING:  # first admission, not a return from preemption
                request.num_cached_tokens = num_cached_tokens
            request.num_computed_tokens = num_cached_tokens
            request.status = RequestStatus.RUNNING
            self._add_running(request)
            output.add(request, num_new_tokens, self.kv_manager.get_block_ids(request.request_id))
            budget -= num_new_tokens

    def _preempt(self, request: Request) -> None:
        self.kv_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue_waiting(request, at_front=True)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.kv_manager.free(request)
        del self.requests[request.request_id]

    def _enqueue_waiting(self, request: Request, at_front: bool = False) -> None:
        if self.is_priority:
            bisect.insort(self.waiting, request, key=_priority_key)
        elif at_front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def _add_running(self, request: Request) -> None:
        if self.is_priority:
            bisect.insort(self.running, request, key=_priority_key)
        else:
            self.running.append(request)

    def _check_stop(self, request: Request) -> FinishReason | None:
        params = request.sampling_params
        token_id = request.output_token_ids[-1]
        if request.num_output_tokens >= params.min_tokens:
            is_eos = not params.ignore_eos and token_id in request.eos_token_ids
            if is_eos or token_id in params.stop_token_ids:
                return FinishReason.STOP
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _check_can_serve(self, request: Request) -> None:
        """Reject requests that could never run, rather than letting them stall the queue forever."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"{request.request_id}: empty prompt")
        if request.num_prompt_tokens > self.max_model_len:
            raise ValueError(f"{request.request_id}: prompt of {request.num_prompt_tokens} tokens exceeds "
                             f"max_model_len={self.max_model_len}")
        # The last sampled token never needs KV, hence the -1.
        max_num_tokens = min(request.num_prompt_tokens + request.sampling_params.max_tokens,
                             max(self.max_model_len, request.num_prompt_tokens + 1))
        num_blocks_needed = cdiv(max_num_tokens - 1, self.kv_manager.block_size)
        if num_blocks_needed > self.kv_manager.num_blocks:
            raise ValueError(f"{request.request_id}: needs up to {num_blocks_needed} KV blocks, "
                             f"the pool has {self.kv_manager.num_blocks}")
