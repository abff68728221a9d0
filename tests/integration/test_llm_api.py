"""The Python API: bad input raises ValueError naming the field and leaves the engine serving;
n > 1 shares the prompt's blocks; stop strings, abort, seeds and logprobs behave end to end."""

from __future__ import annotations

import pytest

from cluster import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), num_kv_blocks=256, max_model_len=512)


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("", {}, "prompt"),
        ([], {}, "prompt"),
        ([5] * 600, {}, "prompt"),
        ("hi", {"max_tokens": 0}, "max_tokens"),
        ("hi", {"temperature": -0.5}, "temperature"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"top_p": 1.5}, "top_p"),
        ([1, 2, 10**6], {}, "prompt_token_ids"),
        ([1, -3], {}, "prompt_token_ids"),
    ],
)
def test_bad_input_names_the_field_and_engine_keeps_serving(llm, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        llm.generate([prompt], SamplingParams(**params))
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(["still serving"], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.token_ids) >= 1
    llm.engine.kv_manager.check_no_leaks()


def test_bad_prompt_in_a_batch_leaves_nothing_queued(llm):
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(["fine", ""], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()


def test_n_choices_share_the_prompt_blocks(llm):
    prompt = list(range(20, 20 + 100))
    hits_before = llm.engine.kv_manager.prefix_cache_hits
    out = llm.generate([prompt], SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=7))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    # choices 1 and 2 found the 96 tokens of the prompt's six full blocks in the prefix cache
    assert llm.engine.kv_manager.prefix_cache_hits - hits_before >= 2 * 96
    llm.engine.kv_manager.check_no_leaks()


def test_seeded_sampling_reproduces(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234)
    a = llm.generate(["seeded prompt"], params)[0].token_ids
    b = llm.generate(["other prompt", "seeded prompt", "x"], params)[1].token_ids
    assert a == b


def test_stop_string_is_cut_and_not_emitted(llm):
    free_run = llm.generate(["Once upon"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text = free_run.text
    assert len(text) > 6, "the tiny model should say something"
    stop = text[3:6]
    out = llm.generate(["Once upon"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason.value == "stop"
    assert out.text == text[: text.index(stop)]


def test_logprobs_returned_for_each_token(llm):
    out = llm.generate(["logprobs"], SamplingParams(max_tokens=5, temperature=0, logprobs=3))[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == token and lp.rank == 1 and len(lp.top) == 3
        assert lp.top[0][0] == token


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("to-abort", list(range(30, 90)), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.num_free_kv_blocks < engine.num_kv_blocks
    engine.abort("to-abort")
    assert not engine.has_unfinished_requests()
    engine.kv_manager.check_no_leaks()


def test_streaming_deltas_concatenate_to_final_text(llm):
    engine = llm.engine
    engine.add_request("stream", "Stream me some text", SamplingParams(max_tokens=20, temperature=0))
    pieces, tokens, finished = [], [], False
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.new_text)
            tokens.extend(out.new_token_ids)
            finished = out.finished
    assert finished
    assert "".join(pieces) == llm.tokenizer.decode(tokens)
