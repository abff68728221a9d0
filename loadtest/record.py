"""One request as the benchmark client saw it, and the per-request latencies derived from it.

Times are time.perf_counter() differences. `start` is when the request was written, as an offset from
the run's start; `chunk_times` and `end` are offsets from `start`. The definitions follow vLLM's
benchmark tool (and DESIGN.md's conventions), so the two read the same:

- TTFT: request written → the first chunk carrying output (text, or token ids over gRPC).
- ITL: the gaps between successive chunks carrying output (a chunk holding two tokens is one gap).
- E2E: request written → the last chunk of the completion (its finish chunk, not `[DONE]`).
- TPOT: (E2E − TTFT) / (output tokens − 1), for requests with more than one output token.

One deliberate difference: vLLM's tool times every chunk that has a choice, output or not. Here a
chunk without output — a chat stream's opening role chunk, a separate finish chunk, as pdserve and
some other servers send — is not a token: it would read as TTFT if sent early, and as a ~0 gap that
pulls ITL down if sent just after the last token. Against servers that put output in every chunk
(vLLM's own) the two tools time the same chunks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    index: int  # the request's place in the workload
    scheduled: float = 0.0  # when the arrival process wanted it sent (offset from the run's start)
    start: float = 0.0  # when it was written
    chunk_times: list[float] = field(default_factory=list)  # each output-carrying chunk, from `start`
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each such chunk, where the API says
    end: float | None = None  # the completion's last chunk, from `start`
    num_input_tokens: int | None = None  # the server's usage count, else what the workload built
    num_expected_input_tokens: int | None = None  # what the workload built (exact with token-id prompts)
    num_output_tokens: int = 0
    output_tokens_from: str = "chunks"  # "usage" (the server's count) | "tokens" (gRPC ids) | "chunks"
    max_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None  # its type: http_429, grpc_UNAVAILABLE, timeout, stream_server_error, ...
    error_detail: str | None = None
    is_cut: bool = False  # still running when the run's duration and grace ran out: cut, not failed
    session: int | None = None
    turn: int | None = None
    output_text: str = field(default="", repr=False)  # kept for multi-turn history; not saved

    @property
    def is_ok(self) -> bool:
        return self.error is None and not self.is_cut

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return self.end

    @property
    def itl(self) -> list[float]:
        times = self.chunk_times
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.end is None or self.num_output_tokens < 2:
            return None
        return (self.end - self.ttft) / (self.num_output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["output_text"]
        out["ttft"], out["tpot"] = self.ttft, self.tpot
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in data.items() if k in names and k != "output_text"})
