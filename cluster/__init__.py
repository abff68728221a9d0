"""pdserve's Python package: `from cluster import LLM, SamplingParams`."""

from cluster.request import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams"]


def __getattr__(name: str):
    # The engine pulls in torch and the model; import it only when asked for.
    if name == "LLM":
        from cluster.engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from cluster.engine.engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)
