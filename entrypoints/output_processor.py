"""The frontends' request tracking, written once: every frontend (the offline LLM, the ZeroMQ
server, the HTTP server) folds the engine's per-completion deltas through an OutputProcessor into
the request's RequestOutput (engine/outputs.py): detokenized text, stop strings, the n
completions, logprobs and timings. What a frontend does with a fold (stream a chunk, abort the
completion a stop string ended, answer when all are done) is its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.messages import AddRequest, RequestDelta, TokenLogprobs, completion_ids
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams


@dataclass
class Fold:
    """What one delta changed of one completion."""
    engine_id: str  # its request's, as add() was given it
    output: RequestOutput
    completion: CompletionOutput
    new_text: str  # text beyond what the previous folds returned (stop strings already cut)
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs]  # empty unless the request asked for logprobs
    stopped: bool  # a stop string ended it here: the engine still runs it until aborted
    # As of this fold: a consumer that reads folds later (from a queue) sees the output as later
    # folds left it, so these are what it must go by.
    finish_reason: str | None  # the completion's
    request_finished: bool  # all of the request's completions

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Completion:
    engine_id: str  # its request's
    output: RequestOutput
    completion: CompletionOutput
    detok: IncrementalDetokenizer
    sent_text: int = 0


@dataclass
class _Request:
    output: RequestOutput
    engine_ids: list[str] = field(default_factory=list)


class OutputProcessor:
    """Requests in flight, by the engine's completion ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._completions: dict[str, _Completion] = {}
        self._requests: dict[str, _Request] = {}  # by engine request id

    def __len__(self) -> int:
        return len(self._completions)

    def add(self, engine_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
            arrival: float | None = None, priority: int = 0, request_id: str | None = None,
            ) -> tuple[RequestOutput, AddRequest]:
        """Tracks a prepared request; returns its output (filled as deltas come) and the message
        that submits it. `request_id` (default: engine_id) is the one the output carries."""
        arrival = time.time() if arrival is None else arrival
        ids = completion_ids(engine_id, params.n)
        out = RequestOutput(request_id if request_id is not None else engine_id, prompt, prompt_ids,
                            [CompletionOutput(i, logprobs=[] if params.logprobs is not None else None)
                             for i in range(len(ids))],
                            prompt_logprobs=[] if params.prompt_logprobs is not None else None,
                            metrics=RequestMetrics(arrival_time=arrival))
        for i, cid in enumerate(ids):
            self._completions[cid] = _Completion(engine_id, out, out.outputs[i],
                                                 IncrementalDetokenizer(self.tokenizer, params))
        self._requests[engine_id] = _Request(out, ids)
        return out, AddRequest(engine_id, prompt_ids, params, arrival, priority)

    def process(self, d: RequestDelta) -> Fold | None:
        """Folds a delta in; None for a completion no longer tracked (ended here by a stop
        string and aborted since, or forgotten)."""
        t = self._completions.get(d.req_id)
        if t is None:
            return None
        out, c = t.output, t.completion
        c.token_ids.extend(d.new_token_ids)
        new_logprobs = d.logprobs if c.logprobs is not None else []
        if c.logprobs is not None:
            c.logprobs.extend(d.logprobs)
        if out.prompt_logprobs is not None:
            out.prompt_logprobs.extend(d.prompt_logprobs)  # (only the first completion computes them)
        m = out.metrics
        m.scheduled_time = m.scheduled_time or d.scheduled_time
        m.first_token_time = m.first_token_time or d.first_token_time
        if c.index == 0:
            m.num_cached_tokens = d.num_cached_tokens or m.num_cached_tokens
        stopped = bool(d.new_token_ids) and t.detok.add(d.new_token_ids)
        if stopped:
            c.finish_reason = "stop"
        elif d.finished:
            c.finish_reason = d.finish_reason or "stop"
            out.error = out.error or d.error
            t.detok.flush()
        c.text = t.detok.text
        new_text = c.text[t.sent_text:]
        t.sent_text = len(c.text)
        if c.finished:
            del self._completions[d.req_id]
            if out.finished:
                m.finish_time = d.finish_time or time.time()
                self._requests.pop(t.engine_id, None)
        return Fold(t.engine_id, out, c, new_text, d.new_token_ids, new_logprobs, stopped, c.finish_reason,
                    out.finished)

    def unfinished_ids(self, engine_id: str) -> list[str]:
        """The engine completion ids of a request still running, for an abort."""
        r = self._requests.get(engine_id)
        return [] if r is None else [i for i in r.engine_ids if i in self._completions]

    def forget(self, engine_id: str) -> list[str]:
        """Stops tracking a request (its client left, or it failed); returns the completion ids
        the engine still runs, which the caller aborts."""
        unfinished = self.unfinished_ids(engine_id)
        for i in unfinished:
            del self._completions[i]
        self._requests.pop(engine_id, None)
        return unfinished

