"""The router's request-side pieces without a server: OpenAI body parsing (n, logprobs, the fields it
refuses by name), the n-choice fan-out and merge, API-key config validation, and how token logprobs
are spelled in OpenAI's shapes."""

from __future__ import annotations

import asyncio

import pytest

from cluster.router.auth import AuthConfig, Authenticator, Limits
from cluster.router.choices import choice_params, choice_request_id, merge
from cluster.router.errors import APIError
from cluster.router.logprobs import CompletionLogprobs, TokenTexts, chat_logprobs
from cluster.router.schema import parse_chat, parse_completion
from cluster.worker.convert import TokenLogprob

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def error_of(parse, body) -> APIError:
    with pytest.raises(APIError) as info:
        parse(body)
    return info.value


def test_n_logprobs_user_and_max_completion_tokens_parse():
    p = parse_completion({"model": "m", "prompt": "x", "n": 3, "logprobs": 2, "user": "u1", "best_of": 3})
    assert (p.n, p.params.n, p.params.logprobs, p.user) == (3, 1, 2, "u1")
    c = parse_chat({**CHAT, "logprobs": True, "top_logprobs": 4, "max_tokens": 9, "max_completion_tokens": 5})
    assert (c.params.logprobs, c.params.max_tokens) == (4, 5)
    assert parse_chat({**CHAT, "logprobs": True}).params.logprobs == 0
    assert parse_chat({**CHAT, "logprobs": False}).params.logprobs is None
    assert parse_completion({"model": "m", "prompt": "x"}).params.logprobs is None
    s = parse_chat({**CHAT, "stream": True, "stream_options": {"include_usage": True}, "priority": -2})
    assert (s.stream, s.include_usage, s.priority) == (True, True, -2)


@pytest.mark.parametrize(
    ("parse", "body", "param"),
    [
        (parse_completion, {"model": "m", "prompt": "x", "n": 0}, "n"),
        (parse_completion, {"model": "m", "prompt": "x", "n": 1000}, "n"),
        (parse_completion, {"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
        (parse_completion, {"model": "m", "prompt": "x", "logprobs": True}, "logprobs"),
        (parse_completion, {"model": "m", "prompt": "x", "echo": True}, "echo"),
        (parse_completion, {"model": "m", "prompt": "x", "suffix": "s"}, "suffix"),
        (parse_completion, {"model": "m", "prompt": "x", "best_of": 2}, "best_of"),
        (parse_completion, {"model": "m", "prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
        (parse_completion, {"model": "m", "prompt": "x", "top_logprobs": 2}, "top_logprobs"),
        (parse_completion, {"model": "m", "prompt": "x", "user": 5}, "user"),
        (parse_completion, {"model": "m", "prompt": "x", "stream_options": {"include_usage": True}},
         "stream_options"),
        (parse_chat, {**CHAT, "top_logprobs": 2}, "top_logprobs"),
        (parse_chat, {**CHAT, "logprobs": True, "top_logprobs": 30}, "top_logprobs"),
        (parse_chat, {**CHAT, "logprobs": 3}, "logprobs"),
        (parse_chat, {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
        (parse_chat, {**CHAT, "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
        (parse_chat, {**CHAT, "tools": []}, "tools"),
    ],
)
def test_bad_values_name_their_field(parse, body, param):
    error = error_of(parse, body)
    assert (error.status, error.param) == (400, param), error.message


def test_choices_get_consecutive_seeds_and_their_own_ids():
    from cluster.request import SamplingParams

    seeded = choice_params(SamplingParams(seed=7, temperature=1.0), 3)
    assert [p.seed for p in seeded] == [7, 8, 9] and all(p.n == 1 for p in seeded)
    assert [p.seed for p in choice_params(SamplingParams(), 2)] == [None, None]
    one = SamplingParams(seed=7)
    assert choice_params(one, 1) == [one]
    assert choice_request_id("r", 0, 1) == "r"
    assert [choice_request_id("r", i, 2) for i in range(2)] == ["r-0", "r-1"]


def test_merge_interleaves_raises_the_first_error_and_closes_every_stream():
    closed: list[int] = []

    async def stream(index: int, items: list, fail: bool = False, wait: float = 0.0):
        try:
            for item in items:
                await asyncio.sleep(wait)
                yield item
            if fail:
                raise APIError(503, "gone")
            await asyncio.sleep(3600)  # a choice still running when the merge is closed
        finally:
            closed.append(index)

    async def run():
        got = []
        merged = merge([stream(0, ["a0", "a1"]), stream(1, ["b0"])])
        async for index, item in merged:
            got.append((index, item))
            if len(got) == 3:
                break
        await merged.aclose()
        assert sorted(got) == [(0, "a0"), (0, "a1"), (1, "b0")]
        assert sorted(closed) == [0, 1]  # the sleeping streams were cancelled and closed
        closed.clear()
        with pytest.raises(APIError, match="gone"):
            async for _ in merge([stream(0, ["x"], wait=0.01), stream(1, [], fail=True)]):
                pass
        assert sorted(closed) == [0, 1]
        closed.clear()
        single = merge([stream(0, ["only"])])
        assert await anext(single) == (0, "only")
        await single.aclose()
        assert closed == [0]

    asyncio.run(run())


def test_auth_config_validates_and_names_fields():
    config = AuthConfig.from_dict({"api_keys": ["k1", "k2"], "limits": {"requests_per_s": 2},
                                   "per_key": {"k2": {"tokens_per_s": 100, "tokens_burst": 500}}})
    assert config.limits.burst("requests") == 2 and config.per_key["k2"].burst("tokens") == 500
    assert config.is_rate_limited and config.is_enabled
    for bad, field in [({"api_keys": ["a", "a"]}, "api_keys"), ({"api_keys": [""]}, "api_keys"),
                       ({"limits": {"requests_per_s": 1}}, "api_keys"),
                       ({"api_keys": ["a"], "per_key": {"b": {}}}, "per_key"),
                       ({"api_keys": ["a"], "limits": {"requests_per_s": -1}}, "requests_per_s"),
                       ({"api_keys": ["a"], "limits": {"tokens_burst": 5}}, "tokens_burst"),
                       ({"api_keys": ["a"], "limits": {"bogus": 1}}, "bogus"),
                       ({"keys": ["a"]}, "keys")]:
        with pytest.raises(ValueError, match=field):
            AuthConfig.from_dict(bad)
    with pytest.raises(ValueError, match="store"):
        Authenticator(config)  # limits without a place to keep the buckets
    assert Limits().is_limited is False


def test_authenticate_reads_bearer_keys_only():
    auth = Authenticator(AuthConfig(api_keys=["sk-good"]))
    assert auth.authenticate("Bearer sk-good") == "sk-good" == auth.authenticate("bearer  sk-good ")
    for value in (None, "", "Bearer sk-bad", "Basic sk-good", "sk-good"):
        with pytest.raises(APIError) as info:
            auth.authenticate(value)
        assert info.value.status == 401 and info.value.type == "authentication_error"
    assert Authenticator(AuthConfig()).authenticate(None) is None  # keys off: anyone


def test_logprobs_shapes(tiny_model_dir):
    from cluster.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_model_dir)
    texts = TokenTexts(tok)
    ids = tok.encode("héllo wörld ✓", add_special_tokens=False)
    # every token's bytes, joined, are the text's bytes: pieces of a character keep their exact bytes
    assert b"".join(bytes(texts.get(t)[1]) for t in ids) == "héllo wörld ✓".encode()
    partial = [t for t in ids if texts.text(t).startswith("bytes:")]
    assert partial, "the test text should split a character across tokens"
    lps = [TokenLogprob(ids[0], -0.5, ((ids[0], -0.5), (ids[1], -1.5))), TokenLogprob(ids[1], -2.0, ())]
    legacy = CompletionLogprobs(texts)
    first, second = legacy.chunk(lps[:1]), legacy.chunk(lps[1:])
    assert first["tokens"] == [texts.text(ids[0])] and first["token_logprobs"] == [-0.5]
    assert first["top_logprobs"] == [{texts.text(ids[0]): -0.5, texts.text(ids[1]): -1.5}]
    assert second["text_offset"] == [len(texts.text(ids[0]))]  # offsets carry on across streamed chunks
    assert second["top_logprobs"] == [{texts.text(ids[1]): -2.0}]  # the chosen token is always listed
    chat = chat_logprobs(texts, lps)
    assert chat[0]["bytes"] == texts.get(ids[0])[1] and chat[0]["top_logprobs"][1]["logprob"] == -1.5
    assert chat[1]["top_logprobs"] == []
