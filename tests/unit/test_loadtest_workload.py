"""Workloads of the benchmark (loadtest/workload.py, prompts.py, sessions.py) with the tiny model's
real tokenizer: exact prompt lengths as ids and as text, shared-prefix groups, multi-turn sessions that
resend their history with the real answers, the chat-like length mix, JSONL files; all seeded."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from cluster.model.tokenizer import Tokenizer
from loadtest.prompts import PromptMaker
from loadtest.sessions import Conversations
from loadtest.workload import WorkloadConfig, build


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def maker(tokenizer) -> PromptMaker:
    return PromptMaker(tokenizer)


def test_random_prompts_have_exact_lengths_as_ids_and_as_text(tokenizer, maker):
    specs = build(WorkloadConfig(input_len="uniform:1:300", output_len="normal:50:10", seed=1), 40, maker)
    wanted = WorkloadConfig(input_len="uniform:1:300", seed=1).inputs.sample(np.random.default_rng(1), 40)
    assert [s.user.num_tokens for s in specs] == wanted
    special = set(tokenizer.eos_token_ids) | set(tokenizer.backend.get_added_tokens_decoder())
    for spec in specs:
        assert len(spec.user.ids) == spec.user.num_tokens and not special & set(spec.user.ids)
        assert len(tokenizer.encode(spec.user.text, add_special_tokens=False)) == spec.user.num_tokens
        assert spec.max_tokens >= 1


def test_same_seed_same_requests(maker):
    config = WorkloadConfig(input_len="64", output_len="8", seed=5)
    a, b = build(config, 10, maker), build(config, 10, maker)
    assert [s.user.ids for s in a] == [s.user.ids for s in b]
    other = build(WorkloadConfig(input_len="64", output_len="8", seed=6), 10, maker)
    assert [s.user.ids for s in a] != [s.user.ids for s in other]
    assert len({tuple(s.user.ids) for s in a}) == 10  # no two requests alike: no accidental prefix hits


def test_without_a_tokenizer_prompts_are_words():
    specs = build(WorkloadConfig(input_len="30", output_len="4"), 3, PromptMaker())
    assert all(s.user.ids is None and len(s.user.text.split()) == 30 for s in specs)


def test_shared_prefix_groups(maker):
    config = WorkloadConfig(kind="shared-prefix", num_prefixes=3, prefix_len="200", input_len="20", output_len="4")
    specs = build(config, 12, maker)
    systems = {tuple(s.system.ids) for s in specs}
    assert len(systems) == 3 and all(len(ids) == 200 for ids in systems)
    assert [s.group for s in specs] == [i % 3 for i in range(12)]
    conversations = Conversations(maker)
    inp = conversations.compose(specs[4])
    assert inp.ids == specs[4].system.ids + specs[4].user.ids and inp.num_tokens == 220
    assert inp.messages == [{"role": "system", "content": specs[4].system.text},
                            {"role": "user", "content": specs[4].user.text}]


def test_multi_turn_sessions_interleave_and_resend_the_real_history(tokenizer, maker):
    config = WorkloadConfig(kind="multi-turn", num_turns="3", num_sessions=2, input_len="10", output_len="5")
    specs = build(config, 9, maker)
    assert [(s.session, s.turn) for s in specs] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2),
                                                   (2, 0), (3, 0), (2, 1)]
    conversations = Conversations(maker)
    first, second = specs[0], specs[2]

    async def turns() -> None:
        waiting = asyncio.create_task(conversations.wait_turn(second))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # turn 1 waits for turn 0's answer
        conversations.record_answer(first, "a real answer")
        await asyncio.wait_for(waiting, 5)

    asyncio.run(turns())
    inp = conversations.compose(second)
    answer = tokenizer.encode("a real answer", add_special_tokens=False)
    assert inp.ids == first.user.ids + answer + second.user.ids
    assert [m["role"] for m in inp.messages] == ["user", "assistant", "user"]
    assert inp.messages[1]["content"] == "a real answer"


def test_chat_mix_is_mostly_short_with_a_long_tail_and_respects_caps(maker):
    specs = build(WorkloadConfig(kind="chat-mix", seed=2), 400, PromptMaker())
    inputs = np.array([s.user.num_tokens for s in specs])
    assert np.median(inputs) < 400 and (inputs > 1500).mean() > 0.03
    capped = build(WorkloadConfig(kind="chat-mix", max_input_len=300, max_output_len=50), 200, PromptMaker())
    assert max(s.user.num_tokens for s in capped) <= 300 and max(s.max_tokens for s in capped) <= 50


def test_jsonl_prompts_token_ids_and_messages(tmp_path, tokenizer, maker):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "hello there world", "max_tokens": 7},
        {"prompt_token_ids": [5, 6, 7]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
    ]) + "\n\n")
    specs = build(WorkloadConfig(kind="jsonl", dataset=path, output_len="3"), 5, maker)
    assert specs[0].user.ids == tokenizer.encode("hello there world", add_special_tokens=False)
    assert [s.max_tokens for s in specs] == [7, 3, 3, 7, 3]  # the file's own, else the output length
    assert specs[1].user.ids == [5, 6, 7] and specs[4].user.ids == [5, 6, 7]  # used again from the top
    inp = Conversations(maker).compose(specs[2])
    assert inp.messages[0] == {"role": "system", "content": "be brief"}
    assert "be brief" in inp.text and "hi" in inp.text  # rendered with the model's chat template


@pytest.mark.parametrize("line, message", [
    ("not json", ":1: not JSON"),
    ('{"prompt": ""}', ":1: prompt"),
    ('{"prompt_token_ids": [1, -2]}', ":1: prompt_token_ids"),
    ('{"messages": [{"role": "user"}]}', ":1: messages"),
    ('{"text": "x"}', ":1: each line needs"),
    ('{"prompt": "x", "max_tokens": 0}', ":1: max_tokens"),
])
def test_bad_jsonl_lines_name_the_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        build(WorkloadConfig(kind="jsonl", dataset=path), 1, PromptMaker())


@pytest.mark.parametrize("kwargs, field", [
    ({"kind": "sharegpt"}, "workload"),
    ({"input_len": "uniform:9"}, "input_len"),
    ({"output_len": "0"}, "output_len"),
    ({"num_prefixes": 0}, "num_prefixes"),
    ({"kind": "jsonl"}, "dataset"),
])
def test_bad_workload_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WorkloadConfig(**kwargs)
