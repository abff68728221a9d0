"""EngineLoop: requests submitted from other threads run to completion on the engine thread."""

from __future__ import annotations

import threading

from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.request import SamplingParams
from cluster.worker.engine_loop import EngineLoop


def test_concurrent_submissions_stream_and_finish(tiny_model_dir):
    engine = LLMEngine(str(tiny_model_dir), EngineConfig(num_kv_blocks=128))
    loop = EngineLoop(engine).start()
    try:
        results: dict[str, list[int]] = {}
        done = {f"r{i}": threading.Event() for i in range(4)}

        def on_output(out):
            results.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                done[out.request_id].set()

        def submit(rid: str, prompt: list[int]):
            def add(e: LLMEngine):
                e.add_request(rid, prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
                loop.subscribe(rid, on_output)

            return loop.call(add)

        futures = [submit(rid, [5 + i, 9, 13 + i]) for i, rid in enumerate(done)]
        for f in futures:
            f.result(timeout=30)
        assert all(ev.wait(30) for ev in done.values())
        assert all(len(tokens) == 6 for tokens in results.values())
        # The same prompts run directly give the same tokens.
        direct = LLMEngine(str(tiny_model_dir), EngineConfig(num_kv_blocks=128))
        for i, rid in enumerate(done):
            direct.add_request(rid, [5 + i, 9, 13 + i], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        want: dict[str, list[int]] = {}
        while direct.has_unfinished_requests():
            for out in direct.step():
                want.setdefault(out.request_id, []).extend(out.new_token_ids)
        assert results == want
    finally:
        loop.stop()
    assert loop.call(lambda e: 1).done() is False  # the thread is gone: nothing runs any more
    engine.kv_manager.check_no_leaks()


def test_errors_in_calls_come_back_to_the_caller(tiny_model_dir):
    engine = LLMEngine(str(tiny_model_dir), EngineConfig(num_kv_blocks=64))
    loop = EngineLoop(engine).start()
    try:
        future = loop.call(lambda e: e.add_request("bad", "", SamplingParams()))
        try:
            future.result(timeout=10)
            raise AssertionError("expected ValueError")
        except ValueError as exc:
            assert "prompt" in str(exc)
        assert loop.call(lambda e: e.has_unfinished_requests()).result(timeout=10) is False
    finally:
        loop.stop()
