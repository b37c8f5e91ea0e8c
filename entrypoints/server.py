"""`mlaserve serve`: a ZeroMQ ROUTER endpoint in front of the engine, plus Prometheus metrics.

One thread runs everything that touches a socket: it reads client frames, forwards requests to
the scheduler process, turns the scheduler's deltas into per-client Delta/Final messages
(detokenizing incrementally), and asks the scheduler for a stats snapshot a few times a second.
The Prometheus HTTP thread only reads the latest snapshot. Every client error is a typed Error
for that request; nothing a client sends can stop the loop.

Lifecycle: SIGTERM/SIGINT stop intake (new Generate -> Error "shutting_down"), let in-flight
requests finish for up to `shutdown_grace_s`, abort what is left, stop the engine processes and
return 0. A request whose client has gone (ZeroMQ cannot route to it any more) is aborted at once.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq
from tokenizers import Tokenizer

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.llm import EngineClient, EngineDeadError
from engine.messages import (
    AbortRequests,
    AddRequest,
    EngineStats,
    GetStats,
    RequestDelta,
    RequestOutputs,
    completion_ids,
)
from engine.model_config import ModelConfig
from engine.sampling_params import parse_sampling_params, tokenize_bad_words, truncate_prompt
from entrypoints.metrics import start_metrics_server
from entrypoints.protocol import (
    Abort,
    Completion,
    Delta,
    Error,
    Final,
    Generate,
    GetModelInfo,
    Health,
    HealthReply,
    ModelInfo,
    Timing,
    TokenLogprob,
    Usage,
    server_decoder,
    server_encoder,
)

STATS_INTERVAL_S = 0.25
MAX_FRAME_BYTES = 16 << 20  # a bigger frame is refused before decoding


@dataclass
class ServedCompletion:
    index: int
    engine_id: str
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sent_text: int = 0  # characters of detok.text already streamed
    finish_reason: str | None = None


@dataclass
class Served:
    identity: bytes
    request_id: str
    stream: bool
    want_logprobs: bool
    arrival: float
    completions: list[ServedCompletion] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    scheduled_time: float = 0.0
    first_token_time: float = 0.0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when asked for

    def unfinished_ids(self) -> list[str]:
        return [c.engine_id for c in self.completions if c.finish_reason is None]


class Server:
    def __init__(self, config: EngineConfig, host: str = "127.0.0.1", port: int = 5555,
                 metrics_port: int | None = None, shutdown_grace_s: float = 30.0, model_name: str | None = None):
        self.config = config
        self.grace_s = shutdown_grace_s
        self.model_name = model_name or Path(config.model_dir).name
        self.tokenizer = Tokenizer.from_file(str(Path(config.model_dir) / "tokenizer.json"))
        self.eos = ModelConfig.from_checkpoint(config.model_dir).eos_token_id
        self.engine = EngineClient(config)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone client raises: we abort its work
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        self.port = self.router.bind_to_random_port(f"tcp://{host}") if port == 0 else port
        if port:
            self.router.bind(f"tcp://{host}:{port}")
        self.address = f"tcp://{host}:{self.port}"
        self.requests: dict[str, tuple[Served, ServedCompletion]] = {}  # by engine request id
        self.by_client: dict[tuple[bytes, str], Served] = {}
        self.latest_stats: EngineStats | None = None
        self.counters = {"requests_received": 0, "bad_messages": 0}
        self._next_id = 0
        self._stop_at: float | None = None
        self._stats_due = 0.0
        self._lock = threading.Lock()
        self.metrics_server = start_metrics_server(self, host, metrics_port) if metrics_port is not None else None

    # ---- lifecycle ----------------------------------------------------------------------------

    def request_stop(self, *_sig) -> None:
        if self._stop_at is None:
            self._stop_at = time.monotonic() + self.grace_s

    def serve_forever(self, install_signals: bool = True) -> int:
        if install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.engine.outputs.socket, zmq.POLLIN)
        try:
            while True:
                if self._stop_at is not None:
                    if not self.by_client:
                        break
                    if time.monotonic() >= self._stop_at:
                        self._abort_all("the server is stopping and its grace period has ended")
                        break
                events = dict(poller.poll(50))
                if self.router in events:
                    self._drain_clients()
                if self.engine.outputs.socket in events:
                    self._drain_engine()
                self._refresh_stats()
                self._check_engine()
        finally:
            self.close()
        return 0

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None
        self.engine.shutdown()
        self.router.close(linger=0)
        self.ctx.term()

    def _check_engine(self) -> None:
        dead = [p for p in self.engine.procs if not p.is_alive()]
        if dead:
            self._abort_all(f"engine process {dead[0].name} exited with code {dead[0].exitcode}",
                            code="engine_error")
            raise EngineDeadError(f"engine process {dead[0].name} exited with code {dead[0].exitcode}")

    # ---- client side --------------------------------------------------------------------------

    def _send(self, identity: bytes, msg) -> bool:
        try:
            self.router.send_multipart([identity, server_encoder.encode(msg)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # unroutable (client gone) or its queue is full
            return False

    def _drain_clients(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, payload = frames[0], frames[-1]
            try:
                msg = server_decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                self.counters["bad_messages"] += 1
                self._send(identity, Error("bad_message", f"cannot read the message: {e}", _request_id_of(payload)))
                continue
            if isinstance(msg, Generate):
                self._on_generate(identity, msg)
            elif isinstance(msg, Abort):
                self._on_abort(identity, msg)
            elif isinstance(msg, Health):
                s = self.latest_stats
                self._send(identity, HealthReply("ok" if self._stop_at is None else "shutting_down",
                                                 s.num_running if s else 0, s.num_waiting if s else 0))
            elif isinstance(msg, GetModelInfo):
                r, c = self.engine.ready, self.config
                self._send(identity, ModelInfo(self.model_name, 1, r.max_model_len, r.vocab_size, r.block_size,
                                               r.kv_cache_tokens, c.max_num_seqs, c.max_num_batched_tokens, c.dtype))

    def _on_generate(self, identity: bytes, msg: Generate) -> None:
        self.counters["requests_received"] += 1
        rid = msg.request_id
        if self._stop_at is not None:
            self._send(identity, Error("shutting_down", "the server is stopping and takes no new requests", rid))
            return
        if (identity, rid) in self.by_client:
            self._send(identity, Error("duplicate_request_id", f"request id {rid!r} is still running", rid))
            return
        if (msg.prompt is None) == (msg.prompt_token_ids is None):
            self._send(identity, Error("invalid_request", "give exactly one of prompt and prompt_token_ids", rid))
            return
        try:
            params = tokenize_bad_words(parse_sampling_params(msg.params), self.tokenizer)
        except ValueError as e:
            self._send(identity, Error("invalid_request", str(e), rid))
            return
        if msg.prompt is not None:
            if len(msg.prompt) > 64 * self.engine.ready.max_model_len:  # cannot fit whatever the tokenizer does
                self._send(identity, Error("invalid_request", f"prompt of {len(msg.prompt)} characters is longer "
                                           f"than the model's context of {self.engine.ready.max_model_len} tokens",
                                           rid))
                return
            ids = self.tokenizer.encode(msg.prompt, add_special_tokens=False).ids
        else:
            ids = list(msg.prompt_token_ids or [])
        ids = truncate_prompt(ids, params, self.engine.ready.max_model_len)
        engine_id = f"s{self._next_id}"
        self._next_id += 1
        now = time.time()
        s = Served(identity, rid, msg.stream, params.logprobs is not None, now, num_prompt_tokens=len(ids),
                   prompt_logprobs=None if params.prompt_logprobs is None else [])
        for i, cid in enumerate(completion_ids(engine_id, params.n)):
            s.completions.append(ServedCompletion(i, cid, IncrementalDetokenizer(self.tokenizer, params)))
            self.requests[cid] = (s, s.completions[-1])
        self.by_client[(identity, rid)] = s
        self.engine.send(AddRequest(engine_id, ids, params, now, msg.priority))

    def _on_abort(self, identity: bytes, msg: Abort) -> None:
        s = self.by_client.get((identity, msg.request_id))
        if s is None:
            self._send(identity, Error("unknown_request", f"no unfinished request {msg.request_id!r}",
                                       msg.request_id))
            return
        self.engine.send(AbortRequests(s.unfinished_ids()))  # the Final(abort) comes back through the engine

    # ---- engine side --------------------------------------------------------------------------

    def _drain_engine(self) -> None:
        while (msg := self.engine.outputs.recv(timeout_ms=0)) is not None:
            if isinstance(msg, RequestOutputs):
                for d in msg.deltas:
                    self._on_delta(d)
            elif isinstance(msg, EngineStats):
                with self._lock:
                    self.latest_stats = msg

    def _on_delta(self, d: RequestDelta) -> None:
        entry = self.requests.get(d.req_id)
        if entry is None:
            return  # already finished here (a stop string) and aborted in the engine
        s, c = entry
        c.token_ids.extend(d.new_token_ids)
        new_logprobs = [_logprob(lp) for lp in d.logprobs] if s.want_logprobs else []
        c.logprobs.extend(new_logprobs)
        if s.prompt_logprobs is not None:  # (only the first completion computes them)
            s.prompt_logprobs.extend(None if lp is None else _logprob(lp) for lp in d.prompt_logprobs)
        if c.index == 0:
            s.num_cached_tokens = d.num_cached_tokens or s.num_cached_tokens
        s.scheduled_time = s.scheduled_time or d.scheduled_time
        s.first_token_time = s.first_token_time or d.first_token_time
        stopped = bool(d.new_token_ids) and c.detok.add(d.new_token_ids)
        if d.finished and not stopped:
            c.detok.flush()
        if d.finished and d.finish_reason == "error":
            self._finish(s, Error("invalid_request", d.error or "rejected by the engine", s.request_id))
            return
        if s.stream and (d.new_token_ids or len(c.detok.text) > c.sent_text):
            text = c.detok.text[c.sent_text:]
            c.sent_text = len(c.detok.text)
            if not self._send(s.identity, Delta(s.request_id, text, d.new_token_ids, new_logprobs, c.index)):
                self._client_gone(s)
                return
        if stopped or d.finished:
            if stopped:
                self.engine.send(AbortRequests([d.req_id]))
            c.finish_reason = "stop" if stopped else (d.finish_reason or "stop")
            self.requests.pop(d.req_id, None)
            if all(x.finish_reason is not None for x in s.completions):
                self._finish(s, self._final(s))

    def _final(self, s: Served) -> Final:
        now = time.time()
        timing = Timing(max(0.0, (s.scheduled_time or now) - s.arrival),
                        max(0.0, (s.first_token_time or now) - s.arrival), now - s.arrival)
        usage = Usage(s.num_prompt_tokens, sum(len(c.token_ids) for c in s.completions), s.num_cached_tokens)
        first = s.completions[0]
        all_n = [Completion(c.index, c.finish_reason, c.detok.text, c.token_ids, [] if s.stream else c.logprobs)
                 for c in s.completions] if len(s.completions) > 1 else []
        return Final(s.request_id, first.finish_reason, first.detok.text, first.token_ids, usage, timing,
                     [] if s.stream else first.logprobs, all_n, s.prompt_logprobs)

    def _finish(self, s: Served, msg) -> None:
        self._forget(s)
        self._send(s.identity, msg)

    def _forget(self, s: Served) -> None:
        for c in s.completions:
            self.requests.pop(c.engine_id, None)
        self.by_client.pop((s.identity, s.request_id), None)

    def _client_gone(self, s: Served) -> None:
        unfinished = s.unfinished_ids()
        self._forget(s)
        if unfinished:
            self.engine.send(AbortRequests(unfinished))

    def _abort_all(self, why: str, code: str | None = None) -> None:
        served = list(self.by_client.values())
        ids = [i for s in served for i in s.unfinished_ids()]
        if ids and code is None:
            try:
                self.engine.send(AbortRequests(ids))
            except zmq.ZMQError:
                pass
        for s in served:
            self._finish(s, Error(code or "shutting_down", why, s.request_id))

    def _refresh_stats(self) -> None:
        now = time.monotonic()
        if now >= self._stats_due:
            self._stats_due = now + STATS_INTERVAL_S
            self.engine.send(GetStats())

    def stats_snapshot(self) -> tuple[EngineStats | None, dict[str, int]]:
        with self._lock:
            return self.latest_stats, dict(self.counters)


def _logprob(lp) -> TokenLogprob:
    return TokenLogprob(lp.token_id, lp.logprob, lp.rank, list(lp.top_ids), list(lp.top_logprobs))


def _request_id_of(payload: bytes) -> str | None:
    """Best effort, for the Error of a message that failed validation: its request_id if readable."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        return None
    rid = raw.get("request_id") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) else None

