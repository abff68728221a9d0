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


def test_build_makes_the_engine_on_the_loop_thread_and_serves_it(tiny_model_dir):
    import torch

    built_on: list[str] = []
    threads_before = torch.get_num_threads()

    def make_engine() -> LLMEngine:
        built_on.append(threading.current_thread().name)
        return LLMEngine(str(tiny_model_dir), EngineConfig(num_kv_blocks=64, num_threads=1))

    loop = EngineLoop.build(make_engine, name="built-engine")
    try:
        assert built_on == ["built-engine"]
        # the engine's own thread setting survives the loop starting (the builder's is not forced back)
        assert loop.call(lambda e: torch.get_num_threads()).result(timeout=10) == 1
        done = threading.Event()
        tokens: list[int] = []

        def on_output(out):
            tokens.extend(out.new_token_ids)
            if out.finished:
                done.set()

        def add(e: LLMEngine) -> None:
            e.add_request("b", [5, 9, 13], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            loop.subscribe("b", on_output)

        loop.call(add).result(timeout=10)
        assert done.wait(30) and len(tokens) == 4
    finally:
        loop.stop()
        torch.set_num_threads(threads_before)  # the engine's setting also reached torch's process-wide default
    loop.engine.kv_manager.check_no_leaks()


def test_build_raises_what_the_factory_raised():
    def broken() -> LLMEngine:
        raise FileNotFoundError("no such model")

    try:
        EngineLoop.build(broken)
        raise AssertionError("expected FileNotFoundError")
    except FileNotFoundError as exc:
        assert "no such model" in str(exc)
