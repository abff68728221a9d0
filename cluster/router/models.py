"""Model routing: which served model a request's `model` name means.

A name here: a served model's own name → that model; an alias (RouterConfig.aliases, or a model's
own `aliases` in the cluster config) → its model; the `auto` alias → its rules in order on the
prompt (token count, max_tokens, regex, keywords), the first match's model, else its default; any
other name → 404 naming `model`. Then spill-over: when the chosen model's admission queue is full
and the model it spills over to (RouterConfig.spill_over, one hop) has room, the request goes
there, and the response names the model that served it.

Every target is checked against the served models when the router is built, so a typo in the config
fails at start-up with the field named, never on a request.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from cluster.router.config import AutoRoute, RouterConfig
from cluster.router.errors import not_found


class ModelRouter:
    def __init__(self, served: Collection[str], config: RouterConfig,
                 model_aliases: Mapping[str, Collection[str]] | None = None) -> None:
        self.served = list(served)
        self.auto: AutoRoute | None = config.auto
        self.spill_over = dict(config.spill_over)
        self.aliases: dict[str, str] = {}
        for model, names in (model_aliases or {}).items():
            self._check(model, f"the aliases of {model!r}")
            for name in names:
                self._add_alias(name, model, f"the aliases of {model!r}")
        for name, model in config.aliases.items():
            self._check(model, f"aliases.{name}")
            self._add_alias(name, model, f"aliases.{name}")
        if self.auto is not None:
            if self.auto.alias in self.served or self.auto.alias in self.aliases:
                raise ValueError(f"auto.alias: {self.auto.alias!r} already names a model or alias")
            self._check(self.auto.default, "auto.default")
            for i, rule in enumerate(self.auto.rules):
                self._check(rule.model, f"auto.rules[{i}].model")
        for model, target in self.spill_over.items():
            self._check(model, "spill_over")
            self._check(target, f"spill_over.{model}")

    def names(self) -> list[str]:
        """Every name a request may use."""
        return [*self.served, *self.aliases, *([self.auto.alias] if self.auto else [])]

    def is_auto(self, name: str) -> bool:
        return self.auto is not None and name == self.auto.alias

    def target(self, name: str) -> str:
        """The model a plain name or alias means (not `auto`: that needs the prompt, see `auto_target`)."""
        if name in self.served:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise not_found(f"the model {name!r} does not exist", "model")

    def auto_target(self, text: str, num_prompt_tokens: int, max_tokens: int) -> str:
        assert self.auto is not None
        return self.auto.target(text, num_prompt_tokens, max_tokens)

    def spill(self, model: str, is_full: Callable[[str], bool]) -> str:
        """`model`, or its spill-over target when `model` is full and the target is not."""
        target = self.spill_over.get(model)
        if target is not None and is_full(model) and not is_full(target):
            return target
        return model

    def _check(self, model: str, where: str) -> None:
        if model not in self.served:
            raise ValueError(f"{where}: model {model!r} is not served (served: {', '.join(self.served)})")

    def _add_alias(self, name: str, model: str, where: str) -> None:
        if name in self.served or self.aliases.get(name, model) != model:
            raise ValueError(f"{where}: {name!r} already names another model")
        self.aliases[name] = model
