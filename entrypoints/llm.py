"""The offline batch API: LLM(model_dir, **engine_options).generate(prompts, params).

An adapter over the asynchronous engine client (entrypoints/async_llm.py), which runs on an event
loop of this object's own thread: generate() prepares the prompts on the caller's thread, submits
them to the loop in batches, and waits for each to finish. So it works wherever it is called from,
a script, a thread, or a notebook whose own loop is running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import queue
import threading
import time
from pathlib import Path

from engine.config import EngineConfig
from engine.messages import EngineStats, completion_ids
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.request_input import RequestInputError, check_priority, prepare_request
from entrypoints.async_llm import AsyncLLM, EngineUnavailable
from entrypoints.engine_client import EngineDeadError

_OPTIONS = {f.name for f in dataclasses.fields(EngineConfig)} - {"model_dir"}
SUBMIT_BATCH = 256  # prompts prepared before they go to the loop in one call (the engine starts on the first)


class _LoopThread:
    """An event loop running on a daemon thread, called into from others."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mlaserve-llm-loop", daemon=True)
        self.thread.start()

    def call(self, fn, *args):
        """fn(*args) on the loop's thread; its result or its exception here."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                done.set_result(fn(*args))
            except BaseException as e:  # noqa: B036 - handed back to the caller
                done.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return done.result()

    def run(self, coro, timeout_s: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class LLM:
    """`LLM(model, **options)`: the options are EngineConfig's (engine/config.py), as
    `mlaserve generate` takes them as flags: LLM(dir, max_num_seqs=8, kv_cache_dtype="fp8")."""

    def __init__(self, model: str | Path | None = None, startup_timeout_s: float = 600.0, **options):
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise TypeError(f"LLM() got unknown engine options {unknown}; the options are EngineConfig's: "
                            f"{', '.join(sorted(_OPTIONS))}")
        if model is None:  # the embedded demo model, trained on first use if it is not shipped
            from model.demo_checkpoint import default_model_dir

            model = default_model_dir()
        self._start(EngineConfig(model_dir=str(model), **options), startup_timeout_s)

    @classmethod
    def from_config(cls, config: EngineConfig, startup_timeout_s: float = 600.0) -> LLM:
        llm = cls.__new__(cls)
        llm._start(config, startup_timeout_s)
        return llm

    def _start(self, config: EngineConfig, startup_timeout_s: float) -> None:
        self.config = config
        self._client = AsyncLLM(config, startup_timeout_s, poll_stats=False)
        self.tokenizer, self.engine = self._client.tokenizer, self._client.engine
        try:
            self._loop = _LoopThread()
            self._loop.call(self._client.start, self._loop.loop)
        except BaseException:
            self._client.shutdown("the offline API did not start")
            raise
        self._next_id = 0
        self._chat: tuple = (None, None)  # (template key, ChatFormatter), made on the first chat()

    @property
    def kv_cache_tokens(self) -> int:
        return self.engine.ready.kv_cache_tokens

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        self._client.shutdown("shutdown() was called")
        self._loop.stop()

    def stats(self) -> EngineStats:
        """The scheduler's counters, counting everything generate() has done."""
        self.engine.check_running()
        try:
            return self._loop.run(self._client.fresh_stats(), timeout_s=60)
        except EngineUnavailable as e:
            raise EngineDeadError(str(e)) from None

    def generate(self, prompts, params=None, use_tqdm: bool = True,
                 priority: list[int] | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of either. params: a SamplingParams
        or dict for all, or a list with one per prompt. priority: one int per prompt, lower sooner
        (an engine started with scheduling_policy="priority"). A request with bad input comes back
        with finish_reason "error" and `error` naming the problem; the others run normally."""
        if not isinstance(prompts, (list, tuple)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt (a string, token ids, or something _prepare refuses by name)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling parameters for {len(prompts)} prompts")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"{len(priorities)} priorities for {len(prompts)} prompts")
        self.engine.check_running()
        outs: list[RequestOutput | None] = [None] * len(prompts)
        finished: queue.SimpleQueue = queue.SimpleQueue()  # indices of finished requests, or the engine's failure
        try:
            submitted = 0
            for start in range(0, len(prompts), SUBMIT_BATCH):
                batch = [self._prepare(i, prompts[i], plist[i], priorities[i], outs)
                         for i in range(start, min(start + SUBMIT_BATCH, len(prompts)))]
                batch = [b for b in batch if b is not None]
                self._loop.call(self._submit, batch, outs, finished)
                submitted += len(batch)
            self._wait(submitted, finished, use_tqdm and len(prompts) > 1)
        except EngineUnavailable as e:
            self._client.shutdown(f"a generate() call ended with {type(e).__name__}")
            raise EngineDeadError(str(e)) from None
        except BaseException as e:
            # Ctrl-C or a dead engine: stop every process before the exception leaves.
            self._client.shutdown(f"a generate() call ended with {type(e).__name__}")
            raise
        return outs

    def chat(self, messages, params=None, use_tqdm: bool = True, tools: list | None = None,
             chat_template: str | None = None, chat_template_kwargs: dict | None = None,
             priority: list[int] | None = None) -> list[RequestOutput]:
        """vLLM's LLM.chat: one conversation (a list of OpenAI-style messages) or a list of them,
        rendered with the checkpoint's chat template (entrypoints/chat_format.py; `chat_template`,
        a Jinja string, replaces it), then generated as generate() does. A conversation that does
        not render comes back with finish_reason "error" and `error` naming the message."""
        from entrypoints.chat_format import ChatFormatError, ChatFormatter

        convs = [messages] if isinstance(messages, list) and messages and isinstance(messages[0], dict) else messages
        if not isinstance(convs, list):
            raise TypeError("messages is a conversation (a list of messages) or a list of conversations")
        key = chat_template or ""
        if self._chat[0] != key:  # (a formatter loads the checkpoint's tokenizer: once per template)
            self._chat = key, ChatFormatter(self.config.model_dir, chat_template)
        plist = params if isinstance(params, list) else [params] * len(convs)
        if len(plist) != len(convs) or (priority is not None and len(priority) != len(convs)):
            raise ValueError(f"sampling parameters and priorities: one per conversation ({len(convs)})")
        results: list[RequestOutput | None] = [None] * len(convs)
        rendered: list[tuple[int, str]] = []
        for i, conv in enumerate(convs):
            try:
                rendered.append((i, self._chat[1].render(conv, tools, chat_template_kwargs)))
            except ChatFormatError as e:
                results[i] = RequestOutput(f"chat-{i}", None, [], [CompletionOutput(0, finish_reason="error")],
                                           error=str(e), metrics=RequestMetrics(arrival_time=time.time()))
        outs = self.generate([p for _, p in rendered], [plist[i] for i, _ in rendered], use_tqdm,
                             [priority[i] for i, _ in rendered] if priority is not None else None)
        for (i, _), out in zip(rendered, outs):
            results[i] = out
        return results

    def _prepare(self, i: int, prompt, raw_params, priority: int, outs: list) -> tuple | None:
        """(index, request id, ids, params, priority, text), or None after filling in outs[i] with
        the error of a prompt that fails alone (one output per completion asked for)."""
        req_id = str(self._next_id)
        self._next_id += 1
        text = prompt if isinstance(prompt, str) else None
        ready = self.engine.ready
        try:
            priority = check_priority(priority)
            ids, params = prepare_request(prompt, raw_params, self.tokenizer, ready.max_model_len, ready.vocab_size)
            grammar = self._client.grammars.prepare(params)  # (compiled here, off the loop)
        except RequestInputError as e:
            n = len(completion_ids(req_id, e.params.n)) if e.params is not None else 1
            outs[i] = RequestOutput(req_id, text, [], [CompletionOutput(j, finish_reason="error") for j in range(n)],
                                    error=str(e), metrics=RequestMetrics(arrival_time=time.time()))
            return None
        return i, req_id, ids, params, priority, text, grammar

    def _submit(self, batch: list[tuple], outs: list, finished: queue.SimpleQueue) -> None:
        """On the loop: each prepared request to the engine, its output filled in as it runs."""
        for i, req_id, ids, params, priority, text, grammar in batch:
            def sink(fold, i=i):
                if isinstance(fold, Exception):
                    finished.put(fold)
                elif fold.request_finished:
                    finished.put(i)

            _, outs[i] = self._client.submit(ids, params, req_id, sink, priority, text, grammar=grammar)

    def _wait(self, count: int, finished: queue.SimpleQueue, progress: bool) -> None:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=count, desc="generate", unit="req")
        try:
            for _ in range(count):
                while True:
                    try:
                        item = finished.get(timeout=0.5)  # (a timeout, so that Ctrl-C is seen)
                        break
                    except queue.Empty:
                        continue
                if isinstance(item, Exception):
                    raise item
                if bar:
                    bar.update(1)
        finally:
            if bar:
                bar.close()
