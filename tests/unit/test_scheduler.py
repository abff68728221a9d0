"""Scheduler lifecycles: schedule -> fake forward -> update, until every request is done and no block leaks.

The fake model really goes through the block tables: each scheduled token is written into its slot
of a fake paged KV cache, and the next token is a function of the context read back from that cache.
A wrong block table, a prefix hit on the wrong block or a block reused while still needed all show
up as tokens that differ from the reference generation.
"""

from __future__ import annotations

import pytest

from cluster.config import EngineConfig
from cluster.engine.scheduler import Scheduler, SchedulerOutput
from cluster.kv.manager import KVCacheManager
from cluster.request import FinishReason, Request, RequestStatus, SamplingParams

BS = 4
VOCAB = 1000
EOS = 5000  # outside the fake model's vocabulary: only scripted tokens hit it


def next_token(context: list[int]) -> int:
    h = 0
    for t in context:
        h = (h * 31 + t + 1) % 1_000_003
    return h % VOCAB


def reference(prompt: list[int], num_tokens: int) -> list[int]:
    tokens, out = list(prompt), []
    for _ in range(num_tokens):
        out.append(next_token(tokens))
        tokens.append(out[-1])
    return out


class FakePagedModel:
    def __init__(self, num_blocks: int, script: dict[str, list[int]] | None = None) -> None:
        self.slots: list[list[int | None]] = [[None] * BS for _ in range(num_blocks)]
        self.script = script or {}  # request_id -> tokens to emit instead of next_token's

    def forward(self, out: SchedulerOutput) -> dict[str, int]:
        batch = list(zip(out.requests, out.num_new_tokens, out.block_ids, strict=True))
        # Every write of the batch lands before any read, as in one layer of a real model.
        for req, n, table in batch:
            end = req.num_computed_tokens + n
            assert len(table) >= -(-end // BS), f"{req.request_id}: block table too short"
            for pos in range(req.num_computed_tokens, end):
                self.slots[table[pos // BS]][pos % BS] = req.all_token_ids[pos]
        sampled = {}
        for req, n, table in batch:
            if req.num_computed_tokens + n < req.num_tokens:
                continue  # a prefill chunk short of the end samples nothing
            context = [self.slots[table[p // BS]][p % BS] for p in range(req.num_tokens)]
            assert context == req.all_token_ids, f"{req.request_id}: KV cache holds the wrong tokens"
            script = self.script.get(req.request_id)
            sampled[req.request_id] = script[req.num_output_tokens] if script else next_token(context)
        return sampled


class Harness:
    def __init__(self, num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 16, caching: bool = True,
                 policy: str = "fcfs", max_model_len: int = 256, script: dict[str, list[int]] | None = None):
        self.config = EngineConfig(block_size=BS, num_kv_blocks=num_blocks, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=budget, enable_prefix_caching=caching,
                                   scheduling_policy=policy)
        self.kv = KVCacheManager(num_blocks, BS, caching)
        self.sched = Scheduler(self.config, self.kv, max_model_len)
        self.model = FakePagedModel(num_blocks, script)
        self.finished: list[Request] = []

    def add(self, request_id: str, prompt: list[int], priority: int = 0, arrival_time: float | None = None,
            **params) -> Request:
        params.setdefault("max_tokens", 8)
        req = Request(request_id, prompt, SamplingParams(**params), eos_token_ids=(EOS,), priority=priority,
                      arrival_time=arrival_time)
        self.sched.add_request(req)
        return req

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self._check(out)
        for req in self.sched.update(out, self.model.forward(out)):
            if req.is_finished:
                self.finished.append(req)
        return out

    def run(self, max_steps: int = 500) -> list[SchedulerOutput]:
        outputs = []
        while self.sched.has_unfinished_requests():
            assert len(outputs) < max_steps, "no progress"
            outputs.append(self.step())
        return outputs

    def check_no_leaks(self) -> None:
        assert not self.sched.has_unfinished_requests()
        assert self.sched.num_running == 0 and self.sched.num_waiting == 0
        self.kv.check_no_leaks()

    def _check(self, out: SchedulerOutput) -> None:
        assert out.num_batched_tokens <= self.config.max_num_batched_tokens
        assert len(out.requests) <= self.config.max_num_seqs
        assert self.sched.num_running <= self.config.max_num_seqs
        assert all(n > 0 for n in out.num_new_tokens)
        ids = [r.request_id for r in out.requests]
        assert len(ids) == len(set(ids))
        assert not set(ids) & {r.request_id for r in out.preempted}
        for req in out.preempted:
            assert req.status == RequestStatus.PREEMPTED and req.num_computed_tokens == 0


def prompt(base: int, n: int) -> list[int]:
    return [(base + i) % VOCAB for i in range(n)]


# ---- lifecycles ----

def test_single_request_to_completion() -> None:
    h = Harness()
    req = h.add("a", prompt(0, 10), max_tokens=5)
    assert (h.sched.num_waiting, h.sched.num_running) == (1, 0)

    out = h.step()
    assert out.requests == [req] and out.num_new_tokens == [10] and out.block_ids == [[0, 1, 2]]
    assert (h.sched.num_waiting, h.sched.num_running) == (0, 1)
    assert req.status == RequestStatus.RUNNING and req.num_output_tokens == 1

    outputs = h.run()
    assert [o.num_new_tokens for o in outputs] == [[1]] * 4
    assert req.output_token_ids == reference(prompt(0, 10), 5)
    assert req.is_finished and req.finish_reason == FinishReason.LENGTH
    assert h.sched.get_request("a") is None
    h.check_no_leaks()


def test_continuous_batching_mixes_prefill_and_decode() -> None:
    h = Harness(budget=32, max_num_seqs=4, caching=False)
    specs = {f"r{i}": (prompt(100 * i, 3 + 3 * i), 6 + i) for i in range(6)}
    for rid in ("r0", "r1", "r2"):
        h.add(rid, specs[rid][0], max_tokens=specs[rid][1])
    outputs = [h.step(), h.step()]
    h.add("r3", specs["r3"][0], max_tokens=specs["r3"][1])
    outputs += [h.step(), h.step()]
    for rid in ("r4", "r5"):
        h.add(rid, specs[rid][0], max_tokens=specs[rid][1])
    outputs += h.run()

    assert any(1 in o.num_new_tokens and max(o.num_new_tokens) > 1 for o in outputs)
    assert max(len(o.requests) for o in outputs) == 4
    assert sorted(r.request_id for r in h.finished) == sorted(specs)
    for req in h.finished:
        p, max_tokens = specs[req.request_id]
        assert req.output_token_ids == reference(p, max_tokens)
    h.check_no_leaks()


def test_chunked_prefill_under_a_small_budget() -> None:
    h = Harness(budget=8)
    req = h.add("a", prompt(0, 21), max_tokens=3)
    outputs = h.run()
    assert [o.num_new_tokens for o in outputs] == [[8], [8], [5], [1], [1]]
    assert req.output_token_ids == reference(prompt(0, 21), 3)
    h.check_no_leaks()


def test_chunked_prefill_shares_the_budget_with_decodes() -> None:
    h = Harness(budget=8)
    a = h.add("a", prompt(0, 4), max_tokens=10)
    assert h.step().num_new_tokens == [4]
    b = h.add("b", prompt(500, 20), max_tokens=2)
    chunks = [h.step() for _ in range(4)]
    assert [o.num_new_tokens for o in chunks] == [[1, 7], [1, 7], [1, 6], [1, 1]]
    assert [o.requests for o in chunks[:3]] == [[a, b]] * 3
    assert b.num_output_tokens == 2 and b.finish_reason == FinishReason.LENGTH
    h.run()
    assert a.output_token_ids == reference(prompt(0, 4), 10)
    assert b.output_token_ids == reference(prompt(500, 20), 2)
    h.check_no_leaks()


# ---- prefix caching ----

def test_prefix_hit_after_the_first_request_finished() -> None:
    h = Harness()
    shared = prompt(0, 12)
    a = h.add("a", shared + [900, 901, 902], max_tokens=3)
    h.run()
    assert a.num_cached_tokens == 0
    hits_before = h.kv.prefix_cache_hits

    b = h.add("b", shared + [800, 801, 802, 803, 804], max_tokens=3)
    out = h.step()
    assert b.num_cached_tokens == 12 and out.num_new_tokens == [5]
    assert b.num_computed_tokens == 17 and b.num_output_tokens == 1  # the whole prompt is done in one step
    assert h.kv.prefix_cache_hits - hits_before == 12
    h.run()
    assert b.output_token_ids == reference(shared + [800, 801, 802, 803, 804], 3)
    h.check_no_leaks()


def test_prefix_hit_on_blocks_computed_in_the_same_step() -> None:
    h = Harness()
    shared = prompt(0, 12)
    a = h.add("a", shared + [1], max_tokens=4)
    b = h.add("b", shared + [2, 3], max_tokens=4)
    out = h.step()
    assert out.num_new_tokens == [13, 2]
    assert b.num_cached_tokens == 12
    assert out.block_ids[0][:3] == out.block_ids[1][:3]
    h.run()
    assert a.output_token_ids == reference(shared + [1], 4)
    assert b.output_token_ids == reference(shared + [2, 3], 4)
    h.check_no_leaks()


def test_identical_prompts_recompute_the_last_block() -> None:
    h = Harness()
    p = prompt(0, 8)
    h.add("a", p, max_tokens=2)
    h.add("b", p, max_tokens=2)
    out = h.step()
    assert out.num_new_tokens == [8, 4]
    h.run()
    assert [r.output_token_ids for r in h.finished] == [reference(p, 2)] * 2
    h.check_no_leaks()


def test_cached_blocks_are_evicted_when_the_pool_fills() -> None:
    h = Harness(num_blocks=6)
    shared = prompt(0, 12)
    h.add("a", shared + [1], max_tokens=2)
    h.run()
    h.add("filler", prompt(300, 20), max_tokens=4)  # needs all six blocks: evicts a's cached content
    h.run()
    b = h.add("b", shared + [2], max_tokens=2)
    h.run()
    assert b.num_cached_tokens == 0
    assert b.output_token_ids == reference(shared + [2], 2)
    h.check_no_leaks()


# ---- preemption ----

@pytest.mark.parametrize("caching", [True, False])
def test_preempted_requests_recompute_and_match_the_reference(caching: bool) -> None:
    h = Harness(num_blocks=8, budget=16, caching=caching)
    specs = {"a": (prompt(0, 6), 12), "b": (prompt(200, 7), 12), "c": (prompt(400, 5), 12)}
    for rid, (p, max_tokens) in specs.items():
        h.add(rid, p, max_tokens=max_tokens)
    outputs = h.run()

    assert any(o.preempted for o in outputs)
    assert sum(r.num_preemptions for r in h.finished) > 0
    for req in h.finished:
        p, max_tokens = specs[req.request_id]
        assert req.output_token_ids == reference(p, max_tokens)
    if caching:
        assert h.kv.prefix_cache_hits > 0  # recomputation reused blocks left by the preempted request
    h.check_no_leaks()


def test_last_running_request_preempts_itself() -> None:
    h = Harness(num_blocks=4)
    a = h.add("a", prompt(0, 5), max_tokens=5)
    b = h.add("b", prompt(100, 7), max_tokens=5)
    h.step()
    h.step()
    out = h.step()  # b's 9th token needs a third block; b is the back of the queue, so it yields
    assert out.requests == [a] and out.preempted == [b]
    assert b.status == RequestStatus.PREEMPTED and b.num_preemptions == 1 and b.num_computed_tokens == 0
    assert h.sched.num_waiting == 1
    h.run()
    assert a.output_token_ids == reference(prompt(0, 5), 5)
    assert b.output_token_ids == reference(prompt(100, 7), 5)
    h.check_no_leaks()


@pytest.mark.parametrize(("policy", "victim"), [("fcfs", "b"), ("priority", "a")])
def test_preemption_victim_follows_the_policy(policy: str, victim: str) -> None:
    h = Harness(num_blocks=4, policy=policy)
    h.add("a", prompt(0, 7), priority=5, arrival_time=0.0, max_tokens=5)
    h.step()
    h.add("b", prompt(100, 5), priority=0, arrival_time=1.0, max_tokens=5)  # joins after a, ranks above it
    preempted = [r.request_id for o in h.run() for r in o.preempted]
    assert preempted[0] == victim
    assert len(h.finished) == 2
    h.check_no_leaks()


# ---- admission ----

def test_max_num_seqs_caps_the_running_set() -> None:
    h = Harness(max_num_seqs=2)
    reqs = [h.add(f"r{i}", prompt(100 * i, 5), max_tokens=3) for i in range(5)]
    out = h.step()
    assert out.requests == reqs[:2]
    assert (h.sched.num_running, h.sched.num_waiting) == (2, 3)
    outputs = h.run()
    assert max(len(o.requests) for o in outputs) == 2
    assert h.finished == reqs  # same lengths, FCFS: they finish in arrival order
    h.check_no_leaks()


def test_waiting_requests_never_preempt_running_ones_nor_overtake_each_other() -> None:
    h = Harness(num_blocks=5)
    a = h.add("a", prompt(0, 12), max_tokens=4)
    h.step()
    h.add("b", prompt(100, 8), max_tokens=2)  # needs two blocks, one is left after a's decode
    h.add("c", prompt(200, 3), max_tokens=2)  # would fit, but FCFS does not let it pass b
    out = h.step()
    assert out.requests == [a] and not out.preempted and h.sched.num_waiting == 2
    admitted = [r.request_id for o in h.run() for r in o.requests if r.request_id != "a"]
    assert admitted.index("b") < admitted.index("c")
    h.check_no_leaks()


def test_priority_policy_admits_best_priority_then_earliest() -> None:
    h = Harness(max_num_seqs=1, policy="priority")
    h.add("low", prompt(0, 4), priority=2, arrival_time=0.0, max_tokens=2)
    h.add("mid_late", prompt(10, 4), priority=1, arrival_time=2.0, max_tokens=2)
    h.add("high", prompt(20, 4), priority=0, arrival_time=3.0, max_tokens=2)
    h.add("mid_early", prompt(30, 4), priority=1, arrival_time=1.0, max_tokens=2)
    h.run()
    assert [r.request_id for r in h.finished] == ["high", "mid_early", "mid_late", "low"]
    h.check_no_leaks()


# ---- abort and external finish ----

def test_abort_waiting_and_running_requests() -> None:
    h = Harness(max_num_seqs=1)
    running = h.add("run", prompt(0, 9), max_tokens=8)
    waiting = h.add("wait", prompt(100, 5), max_tokens=8)
    h.step()
    assert h.kv.num_used_blocks == 3

    assert h.sched.abort_request("wait") is waiting
    assert waiting.status == RequestStatus.FINISHED and waiting.finish_reason == FinishReason.ABORT
    assert h.sched.num_waiting == 0

    assert h.sched.abort_request("run") is running
    assert running.finish_reason == FinishReason.ABORT and h.sched.num_running == 0
    assert h.sched.abort_request("run") is None
    assert h.sched.abort_request("never-added") is None
    h.check_no_leaks()


def test_abort_between_schedule_and_update() -> None:
    h = Harness()
    a = h.add("a", prompt(0, 6))
    b = h.add("b", prompt(50, 6), max_tokens=2)
    out = h.sched.schedule()
    sampled = h.model.forward(out)
    h.sched.abort_request("a")
    assert h.sched.update(out, sampled) == [b]
    assert a.num_output_tokens == 0 and a.finish_reason == FinishReason.ABORT
    h.run()
    h.check_no_leaks()


def test_finish_request_for_a_stop_string() -> None:
    h = Harness()
    a = h.add("a", prompt(0, 6), max_tokens=8)
    h.step()
    h.step()
    assert h.sched.finish_request("a", FinishReason.STOP) is a
    assert a.is_finished and a.finish_reason == FinishReason.STOP and a.num_output_tokens == 2
    h.check_no_leaks()


# ---- stop conditions ----

@pytest.mark.parametrize(
    ("script", "params", "expected", "reason"),
    [
        ([5, 6, EOS, 7], {"max_tokens": 10}, [5, 6, EOS], FinishReason.STOP),
        ([5, 6, EOS, 7], {"max_tokens": 4, "ignore_eos": True}, [5, 6, EOS, 7], FinishReason.LENGTH),
        ([5, 6, 7], {"stop_token_ids": [6]}, [5, 6], FinishReason.STOP),
        ([EOS, EOS, EOS, 1], {"min_tokens": 3}, [EOS, EOS, EOS], FinishReason.STOP),
        ([6, 6, 6], {"stop_token_ids": [6], "min_tokens": 2}, [6, 6], FinishReason.STOP),
        ([1, 2, EOS], {"max_tokens": 2}, [1, 2], FinishReason.LENGTH),
        ([1, 2, EOS], {"max_tokens": 3}, [1, 2, EOS], FinishReason.STOP),  # stop wins over length
    ],
)
def test_stop_conditions(script: list[int], params: dict, expected: list[int], reason: FinishReason) -> None:
    h = Harness(script={"a": script})
    req = h.add("a", prompt(0, 5), **params)
    h.run()
    assert req.output_token_ids == expected and req.finish_reason == reason
    h.check_no_leaks()


@pytest.mark.parametrize(("prompt_len", "num_out"), [(6, 2), (7, 1), (8, 1)])
def test_max_model_len_stops_with_length(prompt_len: int, num_out: int) -> None:
    h = Harness(max_model_len=8)
    req = h.add("a", prompt(0, prompt_len), max_tokens=10)
    h.run()
    assert req.num_output_tokens == num_out and req.finish_reason == FinishReason.LENGTH
    h.check_no_leaks()


# ---- contracts ----

def test_add_request_rejects_what_could_never_run() -> None:
    h = Harness(num_blocks=4, max_model_len=32)
    with pytest.raises(ValueError, match="empty prompt"):
        h.add("empty", [])
    with pytest.raises(ValueError, match="max_model_len"):
        h.add("long", prompt(0, 33))
    with pytest.raises(ValueError, match="KV blocks"):
        h.add("big", prompt(0, 10), max_tokens=10)  # 19 tokens of KV > 4 blocks of 4
    h.add("fits", prompt(0, 10), max_tokens=7)  # 16 tokens of KV: exactly the pool
    with pytest.raises(ValueError, match="duplicate"):
        h.add("fits", prompt(0, 3))
    h.run()
    h.check_no_leaks()


def test_update_requires_a_token_exactly_when_a_request_reaches_its_end() -> None:
    h = Harness(budget=4)
    h.add("a", prompt(0, 6))
    out = h.sched.schedule()  # a 4-token chunk of a 6-token prompt
    with pytest.raises(ValueError):
        h.sched.update(out, {"a": 1})
    h2 = Harness()
    h2.add("a", prompt(0, 6))
    with pytest.raises(ValueError):
        h2.sched.update(h2.sched.schedule(), {})
