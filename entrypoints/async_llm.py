"""The asynchronous engine client (vLLM's AsyncLLM role), the one frontend every interface adapts:
`generate()` submits a request and yields its folds (entrypoints/output_processor.py) as the
engine produces them, and leaving the iteration early (a client gone, a task cancelled) aborts
what still runs (the HTTP server); `submit()` hands each fold to a callback instead (the ZeroMQ
server, the offline LLM on a loop of its own), `release()` and `abort()` end such a request.

All of it runs on the serving event loop: the engine's output socket is read when the loop sees
its file descriptor readable (no reader thread, so a first token does not wait for a thread to
get the GIL from the loop), and a timer asks for stats and watches the engine's processes and
heartbeats. Short prompts are tokenized on the loop (microseconds); long ones on a small pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zmq
from tokenizers import Tokenizer

from engine.config import EngineConfig
from engine.grammar_cache import PeerGrammars
from engine.messages import (
    SCHEDULER_GRAMMARS,
    AbortRequests,
    EngineDead,
    EngineStats,
    GetStats,
    GrammarPlan,
    RequestOutputs,
)
from engine.outputs import RequestOutput
from engine.request_input import check_priority, prepare_inline, prepare_request
from engine.sampling_params import SamplingParams
from entrypoints.engine_client import EngineClient, EngineDeadError, failure_summary
from entrypoints.grammars import GrammarPending, Grammars
from entrypoints.output_processor import Fold, OutputProcessor

log = logging.getLogger("mlaserve.async_llm")

STATS_INTERVAL_S = 0.25
WATCH_INTERVAL_S = 0.05  # how often the engine's processes and heartbeats are checked


class EngineUnavailable(RuntimeError):
    """The engine failed or is shutting down: no request can run."""


@dataclass
class Health:
    status: str  # "ok", "shutting_down", "engine_dead"
    reason: str = ""
    stats_age_s: float = 0.0


class AsyncLLM:
    def __init__(self, config: EngineConfig, startup_timeout_s: float = 600.0, poll_stats: bool = True):
        """Starts the engine's processes (blocking until they are ready); call before serving.
        `poll_stats`: ask the scheduler for its numbers every STATS_INTERVAL_S (for health and
        /metrics; the offline API asks only when it wants them, the scheduler's time being the batch's)."""
        self.config = config
        self.tokenizer = Tokenizer.from_file(str(Path(config.model_dir) / "tokenizer.json"))
        self.engine = EngineClient(config, startup_timeout_s)
        self.ready = self.engine.ready
        self.tracker = OutputProcessor(self.tokenizer)
        self.grammars = Grammars(config.model_dir, self.ready.vocab_size, self.engine.model_cfg.eos_token_id)
        self._scheduler_grammars = PeerGrammars(SCHEDULER_GRAMMARS)  # what the scheduler holds, mirrored
        self._sinks: dict[str, Callable] = {}  # each request's fold callback, by engine request id
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="mlaserve-prepare")
        self._next_id = 0
        self.failure: str | None = None
        self.stopping = False
        self.latest_stats: EngineStats | None = None
        self.stats_time = time.monotonic()
        # Of the Prometheus collector's server counters (entrypoints/metrics.py), those this frontend has.
        self.counters = {"requests_received": 0, "clients_disconnected": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._fd: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stats_due = 0.0 if poll_stats else float("inf")
        self._stats_asked = self._stats_answered = 0
        self._stats_waiters: list[tuple[int, asyncio.Future]] = []
        # Called before and after each batch of outputs is handed to the callbacks (the ZeroMQ
        # server drops departed clients before, and reads frames a send may have left unsignalled after).
        self.before_outputs: list[Callable[[], None]] = []
        self.after_outputs: list[Callable[[], None]] = []

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begins reading the engine's outputs on `loop` (the one serving requests; call on it)."""
        self._loop = loop
        self._fd = self.engine.outputs.socket.getsockopt(zmq.FD)
        loop.add_reader(self._fd, self._drain)
        self._reading = True
        self._timer = loop.call_soon(self._watch)

    def shutdown(self, why: str = "the server stopped") -> None:
        self.stopping = True
        self._stop_reading()
        self.engine.shutdown(why)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _stop_reading(self) -> None:
        """Unregisters the socket from the loop before it closes (from any thread)."""
        loop = self._loop
        if not self._reading or loop is None or loop.is_closed():
            self._reading = False
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop or not loop.is_running():
            self._unregister()
        else:
            done = threading.Event()
            loop.call_soon_threadsafe(lambda: (self._unregister(), done.set()))
            done.wait(5)

    def _unregister(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
            if self._timer is not None:
                self._timer.cancel()

    def health(self) -> Health:
        age = round(time.monotonic() - self.stats_time, 3)
        if self.failure is not None:
            return Health("engine_dead", self.failure, age)
        return Health("shutting_down" if self.stopping else "ok", "", age)

    # ---- requests -----------------------------------------------------------------------------

    async def prepare(self, prompt, params: SamplingParams | dict | None, priority: int = 0,
                      ) -> tuple[list[int], SamplingParams]:
        """Checks and tokenizes (a long prompt on the pool, off the loop), and compiles the
        request's grammar (on the pool unless cached); raises RequestInputError naming the bad field."""
        check_priority(priority)
        r = self.ready
        args = (prompt, params, self.tokenizer, r.max_model_len, r.vocab_size)
        loop = asyncio.get_running_loop()
        if isinstance(prompt, (str, list)) and not prepare_inline(prompt):
            ids, params = await loop.run_in_executor(self._pool, prepare_request, *args)
        else:
            ids, params = prepare_request(*args)
        try:
            self.grammars.prepare(params, compile=False)
        except GrammarPending:
            await loop.run_in_executor(self._pool, self.grammars.prepare, params)
        return ids, params

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str, sink: Callable,
               priority: int = 0, prompt: str | None = None, arrival: float | None = None,
               grammar: GrammarPlan | None = None, grammar_after: int = -1) -> tuple[str, RequestOutput]:
        """Sends a prepared request (on the loop's thread); `sink` gets each of its folds, then,
        if the engine fails first, an EngineUnavailable. Returns its engine id and its output (the
        folds fill it in). End it early with release(). `grammar`: the compiled constraint
        (looked up, normally cached by prepare(), when not given); `grammar_after`: a token
        id the constraint starts after (the reasoning's end)."""
        self._check_available()
        if grammar is None and params.structured_outputs is not None:
            grammar = self.grammars.prepare(params, grammar_after)
        engine_id = f"h{self._next_id}"
        self._next_id += 1
        output, add = self.tracker.add(engine_id, prompt, prompt_ids, params, arrival or time.time(), priority,
                                       request_id)
        if grammar is not None:
            add.grammar = self._scheduler_grammars.outgoing(grammar)
        self._sinks[engine_id] = sink
        self.engine.send(add)
        return engine_id, output

    def release(self, engine_id: str, abort: bool = True) -> list[str]:
        """Stops tracking a request; returns its completions the engine still runs, which are
        aborted unless `abort` is False (the caller aborts many at once with abort_ids)."""
        self._sinks.pop(engine_id, None)
        unfinished = self.tracker.forget(engine_id)
        if unfinished and abort:
            self.abort_ids(unfinished)
        return unfinished

    def abort(self, engine_id: str) -> None:
        """Asks the engine to stop the request's completions; its last fold still comes."""
        self.abort_ids(self.tracker.unfinished_ids(engine_id))

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       priority: int = 0, prompt: str | None = None, grammar_after: int = -1
                       ) -> AsyncIterator[Fold]:
        """The folds of a prepared request until all its completions are done."""
        queue: asyncio.Queue = asyncio.Queue()
        engine_id, _ = self.submit(prompt_ids, params, request_id, queue.put_nowait, priority, prompt,
                                   grammar_after=grammar_after)
        self.counters["requests_received"] += 1
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.request_finished:
                    return
        finally:
            if self.release(engine_id):  # the caller left early: the engine stops its work
                self.counters["clients_disconnected"] += 1

    async def fresh_stats(self) -> EngineStats:
        """The scheduler's numbers as of now (everything sent before this call counted)."""
        self._check_available()
        future = asyncio.get_running_loop().create_future()
        self._stats_asked += 1
        self._stats_waiters.append((self._stats_asked, future))
        self.engine.send(GetStats())
        return await future

    def abort_ids(self, ids: list[str]) -> None:
        if ids and self.failure is None and self.engine.stopped is None:  # (a stopped engine runs nothing)
            try:
                self.engine.send(AbortRequests(ids))
            except EngineDeadError:
                pass

    def _check_available(self) -> None:
        if self.failure is not None:
            raise EngineUnavailable(f"the engine failed: {self.failure}")
        if self.stopping:
            raise EngineUnavailable("the server is stopping and takes no new requests")

    # ---- the engine side (the loop's thread) --------------------------------------------------

    def _on_message(self, msg) -> None:
        if isinstance(msg, RequestOutputs):
            for hook in self.before_outputs:
                hook()
            for d in msg.deltas:
                fold = self.tracker.process(d)
                if fold is None:
                    continue
                if fold.stopped:
                    self.abort_ids([d.req_id])
                sink = self._sinks.get(fold.engine_id)
                if sink is not None:
                    if fold.request_finished:
                        del self._sinks[fold.engine_id]
                    sink(fold)
            for hook in self.after_outputs:
                hook()
        elif isinstance(msg, EngineStats):
            self.latest_stats, self.stats_time = msg, time.monotonic()
            self._stats_answered += 1
            while self._stats_waiters and self._stats_waiters[0][0] <= self._stats_answered:
                _, future = self._stats_waiters.pop(0)
                if not future.done():
                    future.set_result(msg)

    def _on_failure(self, reason: str) -> None:
        self.failure = failure_summary(reason, log)
        error = EngineUnavailable(f"the engine failed: {self.failure}")
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink(error)
        for _, future in self._stats_waiters:
            if not future.done():
                future.set_exception(error)
        self._stats_waiters = []
        self.engine.shutdown(f"it failed: {self.failure}")

    def _send_stats_request(self) -> None:
        if self.failure is None and not self.stopping:
            self._stats_asked += 1
            self.engine.send(GetStats())

    def _drain(self) -> None:
        """Everything the output socket holds (its descriptor signals edges: read to empty)."""
        if not self._reading:
            return
        try:
            while (msg := self.engine.poll(timeout_ms=0)) is not None:
                if isinstance(msg, EngineDead):
                    self._failed(msg.reason)
                    return
                self._on_message(msg)
        except zmq.ZMQError as e:
            if self._reading:
                self._failed(f"the engine's output socket failed: {e}")

    def _watch(self) -> None:
        """Every WATCH_INTERVAL_S: a dead process or a silent scheduler fails the engine; stats
        are asked for every STATS_INTERVAL_S; and the socket is drained in case an edge was missed."""
        if not self._reading:
            return
        self._drain()
        if not self._reading:
            return
        if (failure := self.engine.failure()) is not None:
            self._failed(failure)
            return
        now = time.monotonic()
        if now >= self._stats_due:
            self._stats_due = now + STATS_INTERVAL_S
            self._send_stats_request()
        self._timer = self._loop.call_later(WATCH_INTERVAL_S, self._watch)

    def _failed(self, reason: str) -> None:
        self._unregister()
        self._on_failure(reason)

    def stats_snapshot(self):
        """For the Prometheus collector (entrypoints/metrics.py)."""
        h = self.health()
        return self.latest_stats, dict(self.counters), h
