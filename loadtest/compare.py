"""`--compare A.json B.json`: every figure of two result files side by side, with the ratio B/A.

Runs are paired by label (a sweep's `rate=4` with the other file's `rate=4`); two single-run files
are paired whatever their labels. Ratios read as B relative to A: for throughputs higher is better,
for latencies lower is.
"""

from __future__ import annotations

from typing import Any

from loadtest.console import FIGURES, figure, number, table


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.2f}x"


def pair_runs(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[dict, dict]]:
    if len(a["runs"]) == 1 and len(b["runs"]) == 1:
        return [(a["runs"][0], b["runs"][0])]
    by_label = {run["label"]: run for run in b["runs"]}
    pairs = [(run, by_label[run["label"]]) for run in a["runs"] if run["label"] in by_label]
    if not pairs:
        raise ValueError("compare: the two files share no run label "
                         f"({[r['label'] for r in a['runs']]} vs {[r['label'] for r in b['runs']]})")
    return pairs


def compare_runs(run_a: dict[str, Any], run_b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    sa, sb = run_a["summary"], run_b["summary"]
    rows = [["Figure", names[0], names[1], f"{names[1]}/{names[0]}"]]
    for label, path, scale in FIGURES:
        va, vb = figure(sa, path, scale), figure(sb, path, scale)
        if va is None and vb is None:
            continue
        rows.append([label, number(va), number(vb), ratio(va, vb)])
    text = table(rows)
    errors = sorted(set(sa.get("errors_by_type", {})) | set(sb.get("errors_by_type", {})))
    if errors:
        text += "\nErrors: " + ", ".join(
            f"{e} {sa.get('errors_by_type', {}).get(e, 0)} vs {sb.get('errors_by_type', {}).get(e, 0)}" for e in errors)
    return text


def compare_docs(a: dict[str, Any], b: dict[str, Any], paths: tuple[str, str] = ("A", "B")) -> str:
    blocks = [f"A: {paths[0]} ({_describe(a)})", f"B: {paths[1]} ({_describe(b)})"]
    for run_a, run_b in pair_runs(a, b):
        title = run_a["label"] if run_a["label"] == run_b["label"] else f"{run_a['label']} vs {run_b['label']}"
        blocks.append(f"\n== {title} ==\n{compare_runs(run_a, run_b)}")
    return "\n".join(blocks)


def _describe(doc: dict[str, Any]) -> str:
    config = doc.get("config", {})
    target = config.get("grpc_target") if str(config.get("backend", "")).startswith("grpc") else config.get("base_url")
    parts = [doc.get("date", "?"), str(config.get("backend", "?")), str(target), f"model {config.get('model')}"]
    return ", ".join(parts)
