"""A benchmark invocation end to end: build the workload, settle how prompts are sent, warm up, run
once (or once per sweep value), summarise, print, write the result file and the plots.

How prompts are sent: the chat APIs take messages. Completions and gRPC take token ids when the
tokenizer made them (exact input lengths): pdserve's gRPC API always does; for an OpenAI completions
endpoint `prompt_format=auto` asks the server once (a one-token request with an id prompt) and falls
back to text if it refuses. Input token counts reported are the server's usage counts where it sends
them, else what the workload built.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest import results
from loadtest.arrival import Arrival
from loadtest.backends import BackendConfig, RequestError, error_message, error_type, make_backend
from loadtest.console import summary_text
from loadtest.measure import SLO, summarize
from loadtest.prompts import PromptMaker
from loadtest.record import RequestRecord
from loadtest.runner import Bounds, run
from loadtest.sessions import Conversations
from loadtest.sweep import Sweep
from loadtest.workload import WorkloadConfig, build

PROMPT_FORMATS = ("auto", "ids", "text")
WARMUP_SEED_OFFSET = 1_000_003  # warmup prompts: never the measured ones, which it would put in a prefix cache


@dataclass
class BenchConfig:
    backend: BackendConfig = field(default_factory=BackendConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    arrival: Arrival = field(default_factory=Arrival)
    bounds: Bounds = field(default_factory=Bounds)
    tokenizer: Path | None = None  # the served model's directory (tokenizer.json): exact prompt lengths
    prompt_format: str = "auto"
    slo: SLO | None = None
    sweep: Sweep | None = None
    warmup: int = 0  # requests sent one by one before the run, not measured
    result: Path | None = None
    plot_dir: Path | None = None
    is_progress: bool = True
    label: str = ""

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        if self.prompt_format == "ids" and self.tokenizer is None:
            raise ValueError("prompt_format: token-id prompts need the model's tokenizer (--tokenizer DIR)")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.sweep is not None:  # every point's arrival must be valid before anything is sent
            for value in self.sweep.values:
                self.sweep.arrival(self.arrival, value)

    def as_dict(self) -> dict[str, Any]:
        """The config as the result file keeps it (results.document drops the API key)."""
        out: dict[str, Any] = {"backend": self.backend.kind}
        out.update({k: v for k, v in dataclasses.asdict(self.backend).items() if k != "kind"})
        out["workload"] = self.workload.kind
        out.update({k: v for k, v in dataclasses.asdict(self.workload).items() if k != "kind"})
        out["arrival"] = self.arrival.kind
        out.update({k: v for k, v in dataclasses.asdict(self.arrival).items() if k != "kind"})
        out.update(dataclasses.asdict(self.bounds))
        out.update(tokenizer=self.tokenizer, prompt_format=self.prompt_format, warmup=self.warmup, label=self.label,
                   slo=self.slo.as_dict() if self.slo else None,
                   sweep={"param": self.sweep.param, "values": list(self.sweep.values)} if self.sweep else None)
        if math.isinf(out["rate"]):
            out["rate"] = "inf"  # JSON has no infinity
        return out


def load_tokenizer(path: Path):
    from cluster.model.tokenizer import Tokenizer

    try:
        return Tokenizer.from_dir(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"tokenizer: {exc}") from None


async def run_bench(config: BenchConfig, out=print) -> dict[str, Any]:
    """The result document (also written to `config.result` when set)."""
    maker = PromptMaker(load_tokenizer(config.tokenizer) if config.tokenizer else None)
    specs = workload_for(config, maker, 0)
    backend = make_backend(config.backend)
    target = config.backend.grpc_target if config.backend.kind.startswith("grpc") else config.backend.url
    try:
        try:  # before any figure: a server that cannot be reached or refuses is one clear error
            if config.backend.model is None:
                config.backend.model = await backend.first_model()
            config.backend.use_token_ids = await _use_token_ids(config, backend, specs, maker)
            out(f"{config.backend.kind} {target} model {config.backend.model}: {len(specs)} requests "
                f"({config.workload.kind}), prompts as {'token ids' if config.backend.use_token_ids else 'text'}")
            await _warm_up(config, backend, workload_for(config, maker, WARMUP_SEED_OFFSET, config.warmup), maker)
        except Exception as exc:  # noqa: BLE001 — named by type with the server's message
            raise RequestError(error_type(exc), f"{target}: {error_message(exc)}") from exc
        points = [None] if config.sweep is None else list(config.sweep.values)
        runs = []
        for k, value in enumerate(points):
            specs = specs if k == 0 else workload_for(config, maker, k)
            arrival = config.arrival if value is None else config.sweep.arrival(config.arrival, value)
            label = (config.label or "run") if value is None else config.sweep.label(value)
            params = {} if value is None else {config.sweep.param: config.sweep.param_value(value)}
            outcome = await run(specs, arrival, backend, Conversations(maker), config.bounds,
                                seed=config.workload.seed, progress=config.is_progress, label=label)
            summary = summarize(outcome.records, outcome.duration_s, config.slo, outcome.client_cpu_s)
            out(f"\n{label}: {arrival.describe()}\n{summary_text(summary)}")
            runs.append(results.run_entry(label, params, outcome.started_at, summary, outcome.records))
    finally:
        await backend.close()
    sweep = None if config.sweep is None else {"param": config.sweep.param, "values": list(config.sweep.values)}
    doc = results.document(config.as_dict(), runs, sweep)
    if config.result is not None:
        results.write(config.result, doc, secrets=(config.backend.api_key,))
        out(f"\nresults: {config.result}")
    if config.plot_dir is not None:
        for path in write_plots(doc, config.plot_dir):
            out(f"plot: {path}")
    return doc


def workload_for(config: BenchConfig, maker: PromptMaker, seed_offset: int, num: int | None = None) -> list:
    """The workload of one sweep point (or of the warmup): the same distributions, prompts of their
    own — with the same prompts, a server's prefix cache would answer later points from earlier ones."""
    work = dataclasses.replace(config.workload, seed=config.workload.seed + seed_offset)
    return build(work, config.bounds.num_requests if num is None else num, maker)


def write_plots(doc: dict[str, Any], plot_dir: Path) -> list[Path]:
    # matplotlib takes half a second to import: only when plotting
    from loadtest.plots import plot_cdfs, plot_sweep

    runs = [(run["label"], results.records_of(run)) for run in doc["runs"]]
    paths = [plot_cdfs(runs, Path(plot_dir) / "latency_cdf.png")]
    if doc.get("sweep"):
        paths.append(plot_sweep(doc["runs"], doc["sweep"]["param"], Path(plot_dir) / "sweep.png"))
    return paths


async def _use_token_ids(config: BenchConfig, backend, specs, maker: PromptMaker) -> bool:
    if config.backend.is_chat or not maker.is_exact or config.prompt_format == "text":
        return False
    if config.prompt_format == "ids" or config.backend.kind == "grpc":
        return True
    probe = next((s.user.ids for s in specs if s.user.ids), None)
    return probe is not None and await backend.accepts_token_ids(probe[:8])


async def _warm_up(config: BenchConfig, backend, specs, maker: PromptMaker) -> None:
    """`specs` one at a time, outside any session; a failure here stops the run with the server's
    answer, before any figure is taken."""
    conversations = Conversations(maker)
    for spec in specs:
        spec = dataclasses.replace(spec, session=None, turn=0)
        await asyncio.wait_for(backend.send(conversations.compose(spec), spec, RequestRecord(index=-1), 0.0),
                               config.bounds.timeout_s)
