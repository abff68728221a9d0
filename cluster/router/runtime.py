"""How a router process runs: uvloop under uvicorn's httptools protocol, and the garbage collector kept
off the request path. Measured by loadtest/router_capacity.py (BENCHMARKS.md, "Router capacity"):
asyncio + h11 with GC defaults cost ~700 µs of router CPU per token at 2,000 streams, this ~500 µs,
and the P99 added delay fell from ~1.3 s (full collections stalling every stream) to tens of ms.
"""

from __future__ import annotations

import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

HTTP_PROTOCOL = "httptools"  # uvicorn.Config(http=...): C parser, one transport write per chunk


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on uvloop."""
    import uvloop

    return uvloop.run(main)


def tune_gc() -> None:
    """Call once the router has started. A full collection stops every stream while it walks all
    tracked objects (~80k after start-up: tens of ms to 130 ms here). What is alive after start-up
    stays alive, so it is frozen out of the collector's sight; a request's objects are nearly all freed
    by reference counting, so a young generation of 10,000 objects instead of 700 is seldom reached,
    while cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
