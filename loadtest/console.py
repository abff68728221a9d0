"""The figures a run prints, in the order vLLM's benchmark prints them, and the summary table."""

from __future__ import annotations

from typing import Any

from loadtest.measure import PERCENTILES

LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E"}

# (row label, path into a run's summary, scale for display)
FIGURES: list[tuple[str, str, float]] = [
    ("Completed requests", "num_completed", 1),
    ("Failed requests", "num_failed", 1),
    ("Cut requests (time up)", "num_cut", 1),
    ("Duration (s)", "duration_s", 1),
    ("Input tokens", "num_input_tokens", 1),
    ("Output tokens", "num_output_tokens", 1),
    ("Request throughput (req/s)", "request_throughput", 1),
    ("Output token throughput (tok/s)", "output_throughput", 1),
    ("Total token throughput (tok/s)", "total_token_throughput", 1),
    ("Goodput (req/s)", "goodput.requests_per_s", 1),
    ("Peak output throughput (tok/s)", "peak_output_throughput", 1),
    ("Peak concurrency", "peak_concurrency", 1),
]
for _name, _title in LATENCY_NAMES.items():
    FIGURES.append((f"{_title} mean (ms)", f"{_name}.mean", 1e3))
    FIGURES.extend((f"{_title} P{p} (ms)", f"{_name}.p{p}", 1e3) for p in PERCENTILES)
FIGURES.append(("Client lag P99 (ms)", "client_lag.p99", 1e3))
FIGURES.append(("Client CPU (share of a core)", "client_cpu_share", 1))
CLIENT_BOUND = 0.8  # client CPU share past which the figures may show the client rather than the server


def figure(summary: dict[str, Any], path: str, scale: float = 1.0) -> float | None:
    value: Any = summary
    for part in path.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            return None
        value = value[part]
    return value * scale if scale != 1 else value


def number(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):  # counts (a float figure that happens to be whole still shows its decimals)
        return str(value)
    return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.4g}"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def summary_text(summary: dict[str, Any], title: str = "") -> str:
    rows = [[title or "Figure", "Value"]]
    rows += [[label, number(figure(summary, path, scale))] for label, path, scale in FIGURES
             if figure(summary, path) is not None or path.startswith("num_")]
    text = table(rows)
    if summary.get("errors_by_type"):
        text += "\nErrors: " + ", ".join(f"{k}={v}" for k, v in summary["errors_by_type"].items())
    if (summary.get("client_cpu_share") or 0) > CLIENT_BOUND:
        text += (f"\nWarning: the client used {summary['client_cpu_share']:.0%} of a core: latencies may include"
                 " its own delay (fewer requests, or several client processes)")
    if summary.get("goodput"):
        slo = ", ".join(f"{k}<={v * 1e3:g}ms" for k, v in summary["goodput"]["slo"].items())
        text += f"\nGoodput SLO: {slo} ({summary['goodput']['num_good']} requests met it)"
    return text
