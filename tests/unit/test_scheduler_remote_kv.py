"""Decode-side lifecycle of a disaggregated request, as steps: reserve → (KV lands | transfer fails)
→ schedule → update, each ending in a leak check."""

from __future__ import annotations

from cluster.config import EngineConfig
from cluster.engine.scheduler import Scheduler
from cluster.kv.manager import KVCacheManager
from cluster.request import FinishReason, Request, RequestStatus, SamplingParams

BLOCK = 4


def make_scheduler(num_blocks: int = 32) -> Scheduler:
    config = EngineConfig(block_size=BLOCK, max_num_batched_tokens=64, max_num_seqs=8)
    return Scheduler(config, KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=True), max_model_len=256)


def request(rid: str, prompt: list[int], max_tokens: int = 3) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def run_to_completion(s: Scheduler) -> None:
    while s.has_unfinished_requests():
        out = s.schedule()
        sampled = {r.request_id: 7 for r, n in zip(out.requests, out.num_new_tokens, strict=True)
                   if r.num_computed_tokens + n == r.num_tokens}
        s.update(out, sampled)


def test_reserved_request_is_not_scheduled_until_its_kv_lands():
    s = make_scheduler()
    r = request("a", list(range(10)))
    reservation = s.reserve_for_remote_kv(r)
    assert reservation.first_block_index == 0 and len(reservation.block_ids) == 3  # ceil(10 / 4)
    assert r.status == RequestStatus.WAITING_FOR_KV
    assert s.schedule().requests == []  # nothing to compute: the KV is in flight

    s.complete_remote_kv("a", first_token_id=42)
    assert r.output_token_ids == [42] and r.num_computed_tokens == 10
    out = s.schedule()
    assert out.requests == [r] and out.num_new_tokens == [1]  # straight to decode
    s.update(out, {"a": 5})
    run_to_completion(s)
    assert r.finish_reason == FinishReason.LENGTH and r.output_token_ids[:2] == [42, 5]
    s.kv_manager.check_no_leaks()


def test_blocks_join_the_prefix_cache_only_after_the_kv_lands():
    s = make_scheduler()
    prompt = list(range(100, 113))  # 3 full blocks + 1 token
    s.reserve_for_remote_kv(request("a", prompt))
    # While the KV is in flight, a request with the same prompt must not hit those blocks.
    probe = request("probe", prompt)
    assert s.kv_manager.get_computed_blocks(probe) == ([], 0)
    s.complete_remote_kv("a", 1)
    blocks, num_hit = s.kv_manager.get_computed_blocks(probe)
    assert num_hit == 12 and len(blocks) == 3
    run_to_completion(s)
    s.kv_manager.free(probe)  # get_computed_blocks started tracking it
    s.kv_manager.check_no_leaks()


def test_prefix_hits_shrink_the_range_to_transfer():
    s = make_scheduler()
    shared = list(range(50, 58))  # two full blocks
    first = request("first", shared + [1, 2, 3])
    s.add_request(first)
    run_to_completion(s)  # computes and caches the shared blocks
    second = request("second", shared + [9, 9, 9, 9, 9])
    reservation = s.reserve_for_remote_kv(second)
    assert reservation.first_block_index == 2 and len(reservation.block_ids) == 2  # 13 tokens -> 4 blocks
    assert second.num_cached_tokens == 8
    s.complete_remote_kv("second", 3)
    run_to_completion(s)
    s.kv_manager.check_no_leaks()


def test_failed_transfer_falls_back_to_local_prefill():
    s = make_scheduler()
    r = request("a", list(range(9)))
    s.reserve_for_remote_kv(r)
    s.fall_back_to_local_prefill("a")
    out = s.schedule()
    assert out.requests == [r] and out.num_new_tokens == [9]  # the whole prompt, computed here
    s.update(out, {"a": 1})
    run_to_completion(s)
    assert r.num_output_tokens == 3
    s.kv_manager.check_no_leaks()


def test_abort_while_waiting_for_kv_frees_the_reservation():
    s = make_scheduler()
    s.reserve_for_remote_kv(request("a", list(range(20))))
    s.abort_request("a")
    assert not s.has_unfinished_requests()
    s.kv_manager.check_no_leaks()


def test_reservation_that_does_not_fit_changes_nothing():
    s = make_scheduler(num_blocks=4)
    s.add_request(request("big", list(range(12)), max_tokens=2))
    out = s.schedule()  # holds 3 of the 4 blocks
    assert s.reserve_for_remote_kv(request("b", list(range(30, 40)), max_tokens=2)) is None
    assert s.get_request("b") is None
    s.update(out, {"big": 1})
    run_to_completion(s)
    s.kv_manager.check_no_leaks()


def test_first_token_can_finish_the_request():
    s = make_scheduler()
    r = request("a", list(range(6)), max_tokens=1)
    s.reserve_for_remote_kv(r)
    s.complete_remote_kv("a", 3)
    assert r.is_finished and r.finish_reason == FinishReason.LENGTH
    s.kv_manager.check_no_leaks()
