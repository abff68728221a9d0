"""Model routing (cluster/router/models.py, core.Router.resolve): served names, aliases, `auto` rules
in order with a default, spill-over when a model's queue is full, and config errors naming the field.
No workers: pools with no worker (or addresses never dialled) are enough to resolve a request."""

from __future__ import annotations

import asyncio

import pytest

from cluster.model.tokenizer import Tokenizer
from cluster.router.config import RouterConfig
from cluster.router.core import Router
from cluster.router.dispatch import ModelPool
from cluster.router.errors import APIError
from cluster.router.models import ModelRouter

AUTO = {
    "default": "small",
    "rules": [
        {"model": "large", "min_prompt_tokens": 40},
        {"model": "large", "regex": r"(?i)\bprove\b"},
        {"model": "large", "keywords": ["Step By Step"], "max_max_tokens": 64},
        {"model": "small", "keywords": ["quick"]},
        {"model": "large", "min_max_tokens": 1000},
    ],
}


def routes(config: dict, served=("small", "large"), model_aliases=None) -> ModelRouter:
    return ModelRouter(served, RouterConfig.from_dict(config), model_aliases)


def test_names_and_aliases_resolve_and_unknown_names_are_404_on_model():
    models = routes({"aliases": {"fast": "small"}}, model_aliases={"large": ["big", "L"]})
    assert [models.target(n) for n in ("small", "fast", "big", "L")] == ["small", "small", "large", "large"]
    assert set(models.names()) == {"small", "large", "fast", "big", "L"}
    with pytest.raises(APIError) as info:
        models.target("medium")
    assert info.value.status == 404 and info.value.param == "model"


@pytest.mark.parametrize(("text", "num_tokens", "max_tokens", "want"), [
    ("hello", 5, 16, "small"),  # no rule: the default
    ("hello", 40, 16, "large"),  # long prompt: rule 0
    ("Can you prove it?", 5, 16, "large"),  # regex: rule 1
    ("improve it", 5, 16, "small"),  # the regex wants the whole word
    ("think step by step", 5, 64, "large"),  # keyword, any case, with max_tokens <= 64: rule 2
    ("think step by step", 5, 65, "small"),  # ... but not above it
    ("a quick proof: prove it", 5, 16, "large"),  # rules go in order: rule 1 before rule 3
    ("quick", 5, 2000, "small"),  # rule 3 matches before rule 4 would
    ("long answer please", 5, 2000, "large"),  # rule 4
])
def test_auto_rules_go_in_order_and_fall_back_to_the_default(text, num_tokens, max_tokens, want):
    models = routes({"auto": AUTO})
    assert models.is_auto("auto") and "auto" in models.names()
    assert models.auto_target(text, num_tokens, max_tokens) == want


def test_spill_over_only_when_the_model_is_full_and_the_target_is_not():
    models = routes({"spill_over": {"small": "large"}})
    full: set[str] = set()
    assert models.spill("small", full.__contains__) == "small"
    full.add("small")
    assert models.spill("small", full.__contains__) == "large"
    full.add("large")
    assert models.spill("small", full.__contains__) == "small"  # nowhere better: the 429 comes from small
    assert models.spill("large", full.__contains__) == "large"  # no spill-over configured for large


@pytest.mark.parametrize(("config", "served", "message"), [
    ({"aliases": {"fast": "tiny"}}, ("small",), r"^aliases\.fast: model 'tiny' is not served"),
    ({"auto": {"default": "small", "rules": [{"model": "huge"}]}}, ("small",), r"^auto\.rules\[0\]\.model: "),
    ({"auto": {"default": "nope"}}, ("small",), r"^auto\.default: "),
    ({"spill_over": {"small": "gone"}}, ("small",), r"^spill_over\.small: "),
    ({"aliases": {"small": "large"}}, ("small", "large"), r"^aliases\.small: 'small' already names"),
    ({"auto": {"default": "small", "alias": "large"}}, ("small", "large"), r"^auto\.alias: "),
])
def test_targets_are_checked_against_the_served_models(config, served, message):
    with pytest.raises(ValueError, match=message):
        routes(config, served)


@pytest.mark.parametrize(("config", "message"), [
    ({"admission": {"max_queue": -1}}, r"^admission\.max_queue must be"),
    ({"admission": {"bogus": 1}}, r"^admission\.bogus: unknown field"),
    ({"auto": {"default": "s", "rules": [{"model": "s", "regex": "("}]}}, r"^auto\.rules\[0\]\.regex "),
    ({"auto": {"default": "s", "rules": [{"regex": "x"}]}}, r"^auto\.rules\[0\]\.model: required"),
    ({"auto": {"default": "s", "rules": [{"model": "s", "min_prompt_tokens": 9, "max_prompt_tokens": 3}]}},
     r"^auto\.rules\[0\]\.min_prompt_tokens \(9\) must be <= max_prompt_tokens"),
    ({"auto": {"default": "s", "rules": [{"model": "s", "keywords": "x"}]}}, r"^auto\.rules\[0\]\.keywords "),
    ({"spill_over": {"s": "s"}}, r"^spill_over\.s: a model cannot spill over to itself"),
    ({"poll_interval_s": 0}, r"^poll_interval_s must be"),
    ({"prefix_load_weight": -1}, r"^prefix_load_weight must be"),
    ({"policy": "x"}, r"^policy: unknown field"),
    ({"auth": "keys"}, r"^auth must be a mapping"),  # the auth section is auth.py's AuthConfig
    ({"auth": {"api_keys": ["k", "k"]}}, r"^auth\.api_keys has a key twice"),
])
def test_config_errors_name_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig.from_dict(config)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


def two_models(tokenizer: Tokenizer, config: dict) -> Router:
    pools = {name: ModelPool(name, tokenizer, 2048, unified=[f"127.0.0.1:{port}"])  # never dialled here
             for name, port in (("small", 1), ("large", 2))}
    return Router(pools, RouterConfig.from_dict(config))


def test_resolve_counts_prompt_tokens_for_auto_and_names_the_serving_model(tokenizer):
    router = two_models(tokenizer, {"auto": {"default": "small", "rules": [{"model": "large", "min_prompt_tokens": 30}]}})
    short, long = "a short question", "a much longer question " * 10
    assert len(tokenizer.encode(short)) < 30 <= len(tokenizer.encode(long))
    route = router.resolve("auto", prompt=short, max_tokens=8)
    assert route.name == "small" and route.requested == "auto" and route.prompt_ids == tokenizer.encode(short)
    assert router.resolve("auto", prompt=long, max_tokens=8).name == "large"
    # Token-id prompts and chat messages count too (chat: the chat template's tokens).
    assert router.resolve("auto", prompt=tokenizer.encode(long), max_tokens=8).name == "large"
    chat = router.resolve("auto", messages=[{"role": "user", "content": long}], max_tokens=8)
    assert chat.name == "large" and len(chat.prompt_ids) > len(tokenizer.encode(long))


def test_resolve_spills_over_when_the_queue_is_full(tokenizer):
    config = {"admission": {"max_in_flight": 1, "max_queue": 0}, "spill_over": {"small": "large"}}
    router = two_models(tokenizer, config)

    async def body() -> None:
        assert router.resolve("small", prompt="hi", max_tokens=4).name == "small"
        await router.admission["small"].acquire()  # small is now full
        assert router.resolve("small", prompt="hi", max_tokens=4).name == "large"
        await router.admission["large"].acquire()  # so is large: small's own queue answers (429)
        assert router.resolve("small", prompt="hi", max_tokens=4).name == "small"

    asyncio.run(body())


def test_resolve_rejects_prompts_longer_than_the_context_naming_the_field(tokenizer):
    router = two_models(tokenizer, {})
    with pytest.raises(APIError) as info:
        router.resolve("small", prompt=[5] * 3000, max_tokens=4)
    assert info.value.status == 400 and info.value.param == "prompt"
    with pytest.raises(APIError) as info:
        router.resolve("small", messages=[{"role": "user", "content": "x " * 3000}], max_tokens=4)
    assert info.value.status == 400 and info.value.param == "messages"
