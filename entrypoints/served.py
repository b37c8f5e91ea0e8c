"""What the ZeroMQ server keeps of the requests it serves: each one's record (Served), the table of
those started (by engine request id, over the asynchronous client) with what each client holds
against its limits, and the messages made of them: the Final of a finished request, a token's
logprobs, the request id of a frame that cannot be read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from entrypoints.connections import ClientState, Connections
from entrypoints.output_processor import Fold
from entrypoints.protocol import MAX_REQUEST_ID_CHARS, Completion, Delta, Error, Final, Timing, TokenLogprob, Usage

if TYPE_CHECKING:
    from entrypoints.async_llm import AsyncLLM


@dataclass
class Served:
    client: ClientState
    request_id: str
    stream: bool
    arrival: float
    engine_id: str = ""  # once started
    output: RequestOutput | None = None  # filled by the OutputProcessor once started
    priority: int = 0
    preparing: bool = True  # in the Preparer; no engine id yet
    aborted: bool = False  # an Abort came while preparing

    @property
    def identity(self) -> bytes:
        return self.client.identity

    @property
    def num_completions(self) -> int:
        return len(self.output.outputs) if self.output is not None else 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.output.prompt_token_ids) if self.output is not None else 0



class ServedRequests:
    """The started requests by engine id from their start to their end: each one's folds (from
    the asynchronous client) made into its client's Delta and Final messages, the counts each
    client holds (unfinished completions, prompt tokens) while they run, and their ends
    (finished, client gone, the server stopping, the engine failed)."""

    def __init__(self, llm: AsyncLLM, connections: Connections, send: Callable[[bytes, object], bool]):
        """`send(identity, msg)` sends to a client (False: it is gone)."""
        self.llm, self.connections, self._send = llm, connections, send
        self.by_engine_id: dict[str, Served] = {}

    def __len__(self) -> int:
        return len(self.by_engine_id)

    def start(self, s: Served, ids: list[int], params: SamplingParams) -> None:
        """Counts s against its client and sends it to the engine."""
        s.engine_id, s.output = self.llm.submit(ids, params, s.request_id, lambda fold: self._on_fold(s, fold),
                                                s.priority, None, s.arrival)
        s.preparing = False
        s.client.completions += len(s.output.outputs)
        s.client.prompt_tokens += len(ids)
        self.by_engine_id[s.engine_id] = s

    def _on_fold(self, s: Served, fold: Fold | Exception) -> None:
        if isinstance(fold, Exception):  # the engine failed
            self.finish(s, Error("engine_error", str(fold), s.request_id))
            return
        if fold.finish_reason == "error":
            self.finish(s, Error("invalid_request", fold.output.error or "rejected by the engine", s.request_id))
            return
        if s.stream and (fold.new_token_ids or fold.new_text):
            delta = Delta(s.request_id, fold.new_text, fold.new_token_ids,
                          [logprob_message(lp) for lp in fold.new_logprobs], fold.completion.index)
            if not self._send(s.identity, delta):
                self.forget(s)
                return
        if fold.request_finished:
            self.finish(s, final_message(s))

    def abort(self, s: Served) -> None:
        """Stops s in the engine; its Final (finish reason "abort") still comes."""
        self.llm.abort(s.engine_id)

    def forget(self, s: Served, abort: bool = True) -> list[str]:
        """Stops tracking s and releases what its client held; returns its completions the engine
        still ran (aborted unless `abort` is False)."""
        unfinished = self.llm.release(s.engine_id, abort) if s.engine_id else []
        self.by_engine_id.pop(s.engine_id, None)
        client = s.client
        if client.requests.get(s.request_id) is s:
            del client.requests[s.request_id]
            if not s.preparing:
                client.completions -= s.num_completions
                client.prompt_tokens -= s.num_prompt_tokens
        self.connections.release_if_idle(client)
        return unfinished

    def finish(self, s: Served, msg) -> None:
        self.forget(s)
        self._send(s.identity, msg)

    def client_gone(self, client: ClientState) -> None:
        """Every request of a client whose connection closed ends now (one abort for them all)."""
        self.llm.abort_ids([i for s in list(client.requests.values()) for i in self.forget(s, abort=False)])

    def end_all(self, why: str, code: str = "shutting_down") -> None:
        """Ends every request with an Error of `code`, the engine's work aborted."""
        served = [s for c in list(self.connections.clients.values()) for s in c.requests.values()]
        self.llm.abort_ids([i for s in served for i in self.forget(s, abort=False)])
        for s in served:
            self._send(s.identity, Error(code, why, s.request_id))

def final_message(s: Served) -> Final:
    """The Final of a finished request: its first completion, the others when n > 1, usage and timing."""
    out, m, now = s.output, s.output.metrics, time.time()
    timing = Timing(max(0.0, (m.scheduled_time or now) - s.arrival),
                    max(0.0, (m.first_token_time or now) - s.arrival), now - s.arrival)
    usage = Usage(s.num_prompt_tokens, sum(len(c.token_ids) for c in out.outputs), m.num_cached_tokens)

    def logprobs(c) -> list[TokenLogprob]:
        return [] if s.stream or c.logprobs is None else [logprob_message(lp) for lp in c.logprobs]

    first = out.outputs[0]
    all_n = [Completion(c.index, c.finish_reason, c.text, c.token_ids, logprobs(c))
             for c in out.outputs] if len(out.outputs) > 1 else []
    prompt_logprobs = None if out.prompt_logprobs is None else \
        [None if lp is None else logprob_message(lp) for lp in out.prompt_logprobs]
    return Final(s.request_id, first.finish_reason, first.text, first.token_ids, usage, timing,
                 logprobs(first), all_n, prompt_logprobs)


def logprob_message(lp) -> TokenLogprob:
    return TokenLogprob(lp.token_id, lp.logprob, lp.rank, list(lp.top_ids), list(lp.top_logprobs))


class _RequestIdOnly(msgspec.Struct):
    request_id: str | None = None


_request_id_decoder = msgspec.msgpack.Decoder(_RequestIdOnly)


def request_id_of(payload: bytes) -> str | None:
    """Best effort, for the Error of a message that failed validation: its request_id if readable
    (every other field is skipped unread)."""
    try:
        rid = _request_id_decoder.decode(payload).request_id
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    return rid[:MAX_REQUEST_ID_CHARS] if rid is not None else None
