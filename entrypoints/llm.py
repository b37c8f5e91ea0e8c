"""The offline batch API: LLM(model_dir, **engine_options).generate(prompts, params)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from tokenizers import Tokenizer

from engine.config import EngineConfig
from engine.messages import AbortRequests, EngineStats, GetStats, RequestOutputs, completion_ids
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.request_input import RequestInputError, check_priority, prepare_request
from entrypoints.engine_client import EngineClient
from entrypoints.output_processor import OutputProcessor

_OPTIONS = {f.name for f in dataclasses.fields(EngineConfig)} - {"model_dir"}


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
        self.tokenizer = Tokenizer.from_file(str(Path(config.model_dir) / "tokenizer.json"))
        self.engine = EngineClient(config, startup_timeout_s)
        self._next_id = 0

    @property
    def kv_cache_tokens(self) -> int:
        return self.engine.ready.kv_cache_tokens

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def stats(self) -> EngineStats:
        self.engine.send(GetStats())
        while True:
            msg = self.engine.recv(timeout_s=60)
            if isinstance(msg, EngineStats):
                return msg

    def generate(self, prompts, params=None, use_tqdm: bool = True,
                 priority: list[int] | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of either. params: a SamplingParams
        or dict for all, or a list with one per prompt. priority: one int per prompt, lower sooner
        (an engine started with scheduling_policy="priority"). A request with bad input comes back
        with finish_reason "error" and `error` naming the problem; the others run normally."""
        if not isinstance(prompts, (list, tuple)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt (a string, token ids, or something _submit refuses by name)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling parameters for {len(prompts)} prompts")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"{len(priorities)} priorities for {len(prompts)} prompts")
        tracker = OutputProcessor(self.tokenizer)
        outs: list[RequestOutput] = []
        try:
            for prompt, p, rank in zip(prompts, plist, priorities):
                outs.append(self._submit(prompt, p, tracker, rank))
            self._collect(tracker, outs, use_tqdm and len(prompts) > 1)
        except BaseException as e:
            # Ctrl-C or a dead engine: stop every process before the exception leaves.
            self.engine.shutdown(f"a generate() call ended with {type(e).__name__}")
            raise
        return outs

    def _submit(self, prompt, raw_params, tracker: OutputProcessor, priority: int = 0) -> RequestOutput:
        req_id = str(self._next_id)
        self._next_id += 1
        text = prompt if isinstance(prompt, str) else None
        arrival = time.time()
        ready = self.engine.ready
        try:
            priority = check_priority(priority)
            ids, params = prepare_request(prompt, raw_params, self.tokenizer, ready.max_model_len, ready.vocab_size)
        except RequestInputError as e:  # that prompt alone fails, with one output per completion asked for
            n = len(completion_ids(req_id, e.params.n)) if e.params is not None else 1
            return RequestOutput(req_id, text, [], [CompletionOutput(i, finish_reason="error") for i in range(n)],
                                 error=str(e), metrics=RequestMetrics(arrival_time=arrival))
        out, add = tracker.add(req_id, text, ids, params, arrival, priority)
        self.engine.send(add)
        return out

    def _collect(self, tracker: OutputProcessor, outs: list[RequestOutput], progress: bool) -> None:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(outs), desc="generate", unit="req", initial=sum(o.finished for o in outs))
        while len(tracker):
            msg = self.engine.recv()
            if not isinstance(msg, RequestOutputs):
                continue
            for d in msg.deltas:
                fold = tracker.process(d)
                if fold is None:
                    continue  # an abort we asked for after a stop string
                if fold.stopped:
                    self.engine.send(AbortRequests([d.req_id]))
                if bar and fold.request_finished:
                    bar.update(1)
        if bar:
            bar.close()
