"""PNG plots (matplotlib, Agg: no display needed).

- `plot_cdfs`: the CDFs of TTFT, TPOT, ITL and E2E, one line per run (a sweep's points, or two
  compared files), in milliseconds.
- `plot_sweep`: the latency-vs-throughput curve of a sweep: TTFT and TPOT (P50 and P99) against the
  output throughput each point achieved, each point labelled with its swept value; with an SLO, a
  third panel shows goodput against request throughput per swept value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from loadtest.console import LATENCY_NAMES  # noqa: E402
from loadtest.record import RequestRecord  # noqa: E402


def latency_values(records: list[RequestRecord], name: str) -> list[float]:
    done = [r for r in records if r.is_ok]
    if name == "itl":
        return [gap for r in done for gap in r.itl]
    return [v for v in (getattr(r, name) for r in done) if v is not None]


def plot_cdfs(runs: list[tuple[str, list[RequestRecord]]], path: Path | str, title: str = "") -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (name, label) in zip(axes.flat, LATENCY_NAMES.items(), strict=True):
        for run_label, records in runs:
            values = np.sort(np.asarray(latency_values(records, name)) * 1e3)
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=run_label)
        ax.set_title(f"{label} CDF")
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of " + ("gaps" if name == "itl" else "requests"))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_sweep(points: list[dict[str, Any]], param: str, path: Path | str, title: str = "") -> Path:
    """`points`: result runs ({"params": {param: value}, "summary": {...}}), in sweep order."""
    has_goodput = any(p["summary"].get("goodput") for p in points)
    fig, axes = plt.subplots(1, 3 if has_goodput else 2, figsize=(16 if has_goodput else 11, 4.8))
    xs = [p["summary"]["output_throughput"] for p in points]
    values = [p["params"][param] for p in points]
    for ax, name in zip(axes, ("ttft", "tpot"), strict=False):
        for stat, style in (("p50", "o-"), ("p99", "s--")):
            ys = [_ms(p["summary"][name].get(stat)) for p in points]
            ax.plot(xs, ys, style, label=f"{LATENCY_NAMES[name]} {stat.upper()}")
            for x, y, v in zip(xs, ys, values, strict=True):
                if stat == "p50" and y is not None:
                    ax.annotate(f"{param}={v:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(f"{LATENCY_NAMES[name]} (ms)")
        ax.set_title(f"{LATENCY_NAMES[name]} vs throughput")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if has_goodput:
        ax = axes[2]
        ax.plot(values, [p["summary"]["request_throughput"] for p in points], "o-", label="request throughput")
        ax.plot(values, [(p["summary"].get("goodput") or {}).get("requests_per_s") for p in points], "s--",
                label="goodput")
        ax.set_xlabel(param)
        ax.set_ylabel("requests/s")
        ax.set_title("goodput under the SLO")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1e3


def _save(fig, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
