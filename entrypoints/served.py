"""What the ZeroMQ server keeps of the requests it serves: each one's record (Served), the table of
those started (by engine request id, folded by the OutputProcessor) with what each client holds
against its limits, and the messages made of them: the Final of a finished request, a token's
logprobs, the request id of a frame that cannot be read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from engine.messages import AddRequest, RequestDelta, completion_ids
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from entrypoints.connections import ClientState, Connections
from entrypoints.output_processor import Fold, OutputProcessor
from entrypoints.protocol import MAX_REQUEST_ID_CHARS, Completion, Delta, Error, Final, Timing, TokenLogprob, Usage


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
    """The started requests by engine id (ids "s0", "s1", ...) from their start to their end: the
    engine's deltas folded into each client's Delta and Final messages, the counts each client
    holds (unfinished completions, prompt tokens) while they run, and their ends (finished, client
    gone, the server stopping or the engine failed)."""

    def __init__(self, tracker: OutputProcessor, connections: Connections,
                 send: Callable[[bytes, object], bool], abort: Callable[[list[str]], None]):
        """`send(identity, msg)` sends to a client (False: it is gone); `abort(ids)` stops engine requests."""
        self.tracker, self.connections = tracker, connections
        self._send, self._abort = send, abort
        self.by_engine_id: dict[str, Served] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.by_engine_id)

    def start(self, s: Served, ids: list[int], params: SamplingParams) -> AddRequest:
        """Counts s against its client and tracks it; returns what to send the engine."""
        s.client.completions += len(completion_ids("x", params.n))
        s.client.prompt_tokens += len(ids)
        engine_id = f"s{self._next_id}"
        self._next_id += 1
        s.preparing, s.engine_id = False, engine_id
        s.output, add = self.tracker.add(engine_id, None, ids, params, s.arrival, s.priority, s.request_id)
        self.by_engine_id[engine_id] = s
        return add

    def fold(self, d: RequestDelta) -> tuple[Served, Fold] | None:
        """None when the request finished here already (a stop string) and is aborted in the engine."""
        fold = self.tracker.process(d)
        return None if fold is None else (self.by_engine_id[fold.engine_id], fold)

    def unfinished_ids(self, s: Served) -> list[str]:
        return self.tracker.unfinished_ids(s.engine_id) if s.engine_id else []

    def forget(self, s: Served) -> list[str]:
        """Stops tracking s and releases what its client held; returns its completions the engine still runs."""
        unfinished = self.tracker.forget(s.engine_id) if s.engine_id else []
        self.by_engine_id.pop(s.engine_id, None)
        client = s.client
        if client.requests.get(s.request_id) is s:
            del client.requests[s.request_id]
            if not s.preparing:
                client.completions -= s.num_completions
                client.prompt_tokens -= s.num_prompt_tokens
        self.connections.release_if_idle(client)
        return unfinished

    def on_delta(self, d: RequestDelta) -> None:
        if (folded := self.fold(d)) is None:
            return
        s, fold = folded
        if fold.finish_reason == "error":
            self.finish(s, Error("invalid_request", d.error or "rejected by the engine", s.request_id))
            return
        if s.stream and (fold.new_token_ids or fold.new_text):
            delta = Delta(s.request_id, fold.new_text, fold.new_token_ids,
                          [logprob_message(lp) for lp in fold.new_logprobs], fold.completion.index)
            if not self._send(s.identity, delta):
                self._abort(self.forget(s))
                return
        if fold.stopped:
            self._abort([d.req_id])
        if fold.request_finished:
            self.finish(s, final_message(s))

    def finish(self, s: Served, msg) -> None:
        self.forget(s)
        self._send(s.identity, msg)

    def client_gone(self, client: ClientState) -> None:
        """Every request of a client whose connection closed ends now (one abort for them all)."""
        self._abort([i for s in list(client.requests.values()) for i in self.forget(s)])

    def end_all(self, why: str, code: str | None = None) -> None:
        """Ends every request with an Error of `code` (default "shutting_down"), aborting what the
        engine runs unless it failed (code "engine_error")."""
        served = [s for c in list(self.connections.clients.values()) for s in c.requests.values()]
        if code is None:
            self._abort([i for s in served for i in self.unfinished_ids(s)])
        for s in served:
            self.finish(s, Error(code or "shutting_down", why, s.request_id))


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
