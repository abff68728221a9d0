"""BENCHMARKS.md upkeep: each benchmark owns one marked section and rewrites only that."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path | str, key: str, title: str, body: str) -> None:
    """Replace the text between `<!-- key:begin -->` and `<!-- key:end -->` with `body`; append the
    section under `## title` if the file lacks it. Everything outside the markers is kept."""
    path = Path(path)
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    path.write_text(text)
