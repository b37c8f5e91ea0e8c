"""The asynchronous engine client (vLLM's AsyncLLM role): `generate()` submits a request and
yields its folds (entrypoints/output_processor.py) as the engine produces them; leaving the
iteration early (a client gone, a task cancelled) aborts what still runs. The HTTP server is a
thin adapter over it.

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
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zmq
from tokenizers import Tokenizer

from engine.config import EngineConfig
from engine.messages import AbortRequests, EngineDead, EngineStats, GetStats, RequestOutputs
from engine.request_input import check_priority, prepare_inline, prepare_request
from engine.sampling_params import SamplingParams
from entrypoints.engine_client import EngineClient, EngineDeadError, failure_summary
from entrypoints.output_processor import Fold, OutputProcessor
from entrypoints.shared_engine import SharedEngine

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
    def __init__(self, config: EngineConfig, startup_timeout_s: float = 600.0):
        """Starts the engine's processes (blocking until they are ready); call before serving."""
        self.config = config
        self.tokenizer = Tokenizer.from_file(str(Path(config.model_dir) / "tokenizer.json"))
        self.engine = EngineClient(config, startup_timeout_s)
        self.ready = self.engine.ready
        self.tracker = OutputProcessor(self.tokenizer)
        self._streams: dict[str, asyncio.Queue] = {}  # each request's folds, by engine request id
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
        self._stats_due = 0.0
        self._shared: list[SharedEngine] = []

    def share(self, prefix: str = "s") -> SharedEngine:
        """The engine for a frontend whose engine request ids start with `prefix` (this one's start
        with "h"); call before start()."""
        shared = SharedEngine(self, prefix)
        self._shared.append(shared)
        return shared

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
        """Checks and tokenizes (a long prompt on the pool, off the loop); raises RequestInputError
        naming the bad field."""
        check_priority(priority)
        r = self.ready
        args = (prompt, params, self.tokenizer, r.max_model_len, r.vocab_size)
        if isinstance(prompt, (str, list)) and not prepare_inline(prompt):
            return await asyncio.get_running_loop().run_in_executor(self._pool, prepare_request, *args)
        return prepare_request(*args)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       priority: int = 0, prompt: str | None = None) -> AsyncIterator[Fold]:
        """The folds of a prepared request until all its completions are done."""
        self._check_available()
        engine_id = f"h{self._next_id}"
        self._next_id += 1
        self.counters["requests_received"] += 1
        output, add = self.tracker.add(engine_id, prompt, prompt_ids, params, time.time(), priority, request_id)
        queue = self._streams[engine_id] = asyncio.Queue()
        self.engine.send(add)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.request_finished:
                    return
        finally:
            self._streams.pop(engine_id, None)
            unfinished = self.tracker.forget(engine_id)
            if unfinished:  # the caller left early: the engine stops its work
                self.counters["clients_disconnected"] += 1
                self._abort(unfinished)

    def _abort(self, ids: list[str]) -> None:
        if self.failure is None and self.engine.stopped is None:  # (a stopped engine runs nothing)
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
            for d in msg.deltas:
                fold = self.tracker.process(d)
                if fold is None:
                    continue
                if fold.stopped:
                    self._abort([d.req_id])
                queue = self._streams.get(fold.engine_id)
                if queue is not None:
                    queue.put_nowait(fold)
        elif isinstance(msg, EngineStats):
            self.latest_stats, self.stats_time = msg, time.monotonic()

    def _on_failure(self, reason: str) -> None:
        self.failure = failure_summary(reason, log)
        for queue in self._streams.values():
            queue.put_nowait(EngineUnavailable(f"the engine failed: {self.failure}"))
        self.engine.shutdown(f"it failed: {self.failure}")

    def _send_stats_request(self) -> None:
        if self.failure is None and not self.stopping:
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
                msg = self._hand_over(msg)
                if msg is not None:
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

    def _hand_over(self, msg):
        """Gives the shared frontends theirs; returns what is left."""
        if not self._shared:
            return msg
        if isinstance(msg, EngineStats):
            for shared in self._shared:
                shared.deliver(msg)
            return msg
        if isinstance(msg, RequestOutputs):
            mine = []
            theirs: dict[int, list] = {}
            for d in msg.deltas:
                owner = next((i for i, sh in enumerate(self._shared) if d.req_id.startswith(sh.prefix)), None)
                (mine if owner is None else theirs.setdefault(owner, [])).append(d)
            for i, deltas in theirs.items():
                self._shared[i].deliver(RequestOutputs(deltas))
            return RequestOutputs(mine) if mine else None
        return msg

    def _failed(self, reason: str) -> None:
        self._unregister()
        for shared in self._shared:
            shared.deliver(EngineDead(reason))
        self._on_failure(reason)

    def stats_snapshot(self):
        """For the Prometheus collector (entrypoints/metrics.py)."""
        h = self.health()
        return self.latest_stats, dict(self.counters), h
