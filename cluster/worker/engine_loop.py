"""EngineLoop: one thread that owns an LLMEngine and steps it; everyone else talks to it by message.

The engine is not thread-safe and its step is compute-bound, so it gets a thread of its own. Server
handlers (asyncio or threads) never touch the engine: they `call` a function that runs on the engine
thread between two steps and get its result back as a future, and they `subscribe` to a request's
outputs, which the loop delivers as each step produces them. While nothing is running the thread
sleeps on its command queue instead of spinning.

Workers build their engine on this thread too (`EngineLoop.build`), so that it is the only thread of
the process that ever ran torch's OpenMP parallel regions. GNU OpenMP gives every thread that does a
team of its own, and once the process has more OpenMP threads than cores it stops spinning between
parallel regions and sleeps instead: measured here (2 cores, small preset, batch 1), a decode step
took ~10.5 ms on an engine thread when the model had been loaded on the main thread, against ~6.3 ms
when it was loaded on the engine thread itself — the same as on the main thread alone.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from cluster.engine.engine import LLMEngine
from cluster.engine.outputs import RequestOutput
from cluster.request import FinishReason

logger = logging.getLogger(__name__)

T = TypeVar("T")
OutputCallback = Callable[[RequestOutput], None]

_IDLE_WAIT_S = 0.05  # nothing to do: wake at least this often to notice stop()
_PENDING_KV_WAIT_S = 0.001  # only transfers in flight: poll them often, but don't spin


class EngineLoop:
    def __init__(self, engine: LLMEngine, name: str = "engine-loop") -> None:
        """A loop over an engine built elsewhere (tests, tools); workers use `build`. Call `start`."""
        self._init(engine, name, target=self._run)

    @classmethod
    def build(cls, make_engine: Callable[[], LLMEngine], name: str = "engine-loop") -> EngineLoop:
        """Build the engine on the loop's own thread (see the module docstring), then step it there.
        Returns once the engine is built; raises what `make_engine` raised."""
        built: Future[None] = Future()
        loop = cls.__new__(cls)
        loop._init(None, name, target=lambda: loop._build_and_run(make_engine, built))
        loop._thread.start()
        built.result()
        return loop

    def _init(self, engine: LLMEngine | None, name: str, target: Callable[[], None]) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], Future]] = queue.SimpleQueue()
        self._subscribers: dict[str, OutputCallback] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        # OpenMP thread counts are per thread: carry the creator's setting over to the engine thread.
        self._num_threads = torch.get_num_threads()
        self.num_steps = 0

    def _build_and_run(self, make_engine: Callable[[], LLMEngine], built: Future) -> None:
        torch.set_num_threads(self._num_threads)  # the engine's config may set its own while building
        try:
            self.engine = make_engine()
        except BaseException as exc:
            built.set_exception(exc)
            return
        self._num_threads = torch.get_num_threads()  # as the engine's config left it
        built.set_result(None)
        self._run()

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._thread.join(timeout)

    def call(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run `fn(engine)` on the engine thread before the next step."""
        future: Future[T] = Future()
        self._commands.put((fn, future))
        return future

    def subscribe(self, request_id: str, callback: OutputCallback) -> None:
        """Deliver every RequestOutput of `request_id` to `callback` (on the engine thread; keep it cheap).

        Call it from inside a `call` that adds the request, so no output can slip past."""
        self._subscribers[request_id] = callback

    def unsubscribe(self, request_id: str) -> None:
        self._subscribers.pop(request_id, None)

    # ---- the thread ----
    def _run(self) -> None:
        torch.set_num_threads(self._num_threads)
        while not self._stopped.is_set():
            self._run_commands(block=not self.engine.has_unfinished_requests())
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # a bug must not silently kill every stream: fail them loudly instead
                logger.exception("engine step failed; aborting running requests")
                self._abort_all()
                continue
            self.num_steps += 1
            for out in outputs:
                callback = self._subscribers.get(out.request_id)
                if callback is not None:
                    callback(out)
                    if out.finished and self._is_done(out.request_id):
                        self._subscribers.pop(out.request_id, None)
            if not outputs and self.engine.transfers.has_pending:
                self._run_commands(block=True, timeout=_PENDING_KV_WAIT_S)

    def _run_commands(self, block: bool, timeout: float = _IDLE_WAIT_S) -> None:
        try:
            item = self._commands.get(timeout=timeout) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as exc:  # handed to the caller, who decides what it means
                    future.set_exception(exc)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _is_done(self, request_id: str) -> bool:
        return not self.engine.is_request_open(request_id)

    def _abort_all(self) -> None:
        """Abort every subscribed request and tell its subscriber, so no stream waits forever."""
        for request_id, callback in list(self._subscribers.items()):
            self.engine.abort(request_id)
            del self._subscribers[request_id]
            callback(RequestOutput(request_id=request_id, index=0, new_token_ids=[], new_text="",
                                   new_logprobs=None, finished=True, finish_reason=FinishReason.ABORT,
                                   num_prompt_tokens=0, num_cached_tokens=0))
