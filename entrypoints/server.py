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

import logging
import signal
import threading
import time
import traceback
from pathlib import Path

import msgspec
import zmq
from tokenizers import Tokenizer

from engine.config import EngineConfig
from engine.messages import (
    AbortRequests,
    EngineDead,
    EngineStats,
    GetStats,
    RequestOutputs,
    completion_ids,
)
from engine.request_input import RequestInputError
from engine.sampling_params import SamplingParams
from entrypoints.connections import ClientLimits, ClientState, Connections, open_router
from entrypoints.engine_client import EngineClient, failure_summary
from entrypoints.metrics import start_metrics_server
from entrypoints.output_processor import OutputProcessor
from entrypoints.protocol import (
    PROTOCOL_VERSION,
    Abort,
    Error,
    Final,
    Generate,
    GetModelInfo,
    Health,
    HealthReply,
    ModelInfo,
    Timing,
    Usage,
    server_decoder,
    server_encoder,
)
from entrypoints.request_prep import Preparer
from entrypoints.served import Served, ServedRequests, request_id_of

log = logging.getLogger("mlaserve.server")

STATS_INTERVAL_S = 0.25
MAX_PREPARING = 64  # requests being prepared at once; past it the loop reads no more frames until some finish


class Server:
    def __init__(self, config: EngineConfig, host: str = "127.0.0.1", port: int = 5555,
                 metrics_port: int | None = None, shutdown_grace_s: float = 30.0, model_name: str | None = None,
                 metrics_host: str = "127.0.0.1", max_completions_per_client: int | None = None,
                 max_prompt_tokens_per_client: int | None = None, engine=None):
        """`engine`: the engine's processes as another frontend shares them (AsyncLLM.share()),
        instead of starting them here."""
        self.config = config
        self.grace_s = shutdown_grace_s
        self.model_name = model_name or Path(config.model_dir).name
        self.tokenizer = Tokenizer.from_file(str(Path(config.model_dir) / "tokenizer.json"))
        self.engine = engine if engine is not None else EngineClient(config)
        ready = self.engine.ready
        # One connection may hold half the engine's batch and its whole cache's worth of prompt
        # by default: enough for a load generator on one socket, and never every slot.
        self.limits = ClientLimits(
            max_completions_per_client or max(1, config.max_num_seqs * config.ep_size // 2),
            max_prompt_tokens_per_client or ready.kv_cache_tokens)
        self.preparer = Preparer(self.tokenizer, ready.max_model_len, ready.vocab_size)
        self.ctx = zmq.Context()
        self.router, self.port = open_router(self.ctx, host, port)
        self.connections = Connections(self.router)
        self.address = f"tcp://{host}:{self.port}"
        self.requests = ServedRequests(OutputProcessor(self.tokenizer), self.connections, self._send,
                                       self._abort)
        self.latest_stats: EngineStats | None = None
        self.stats_time = time.monotonic()
        self.engine_failure: str | None = None  # why the engine stopped, once it has
        self.counters = {"requests_received": 0, "bad_messages": 0, "requests_refused_by_limits": 0,
                         "clients_disconnected": 0}
        self._stop_at: float | None = None
        self._stats_due = 0.0
        self._lock = threading.Lock()
        self.metrics_server = start_metrics_server(self, metrics_host, metrics_port) \
            if metrics_port is not None else None

    # ---- lifecycle ----------------------------------------------------------------------------

    def request_stop(self, *_sig) -> None:
        if self._stop_at is None:
            self._stop_at = time.monotonic() + self.grace_s

    def serve_forever(self, install_signals: bool = True) -> int:
        """Returns 0 after a clean stop, 1 when the engine had failed (the server stays up until
        then to answer health with the reason)."""
        if install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.engine.pollable, zmq.POLLIN)
        poller.register(self.connections.monitor, zmq.POLLIN)
        poller.register(self.preparer.fd, zmq.POLLIN)
        try:
            while True:
                if self._stop_at is not None:
                    if not self.requests and not self.preparer.pending:
                        break
                    if time.monotonic() >= self._stop_at:
                        self.requests.end_all("the server is stopping and its grace period has ended")
                        break
                events = dict(poller.poll(50))
                self._drop_gone_clients()
                if self.preparer.fd in events:
                    self._submit_prepared()
                if self.router in events and self.preparer.pending < MAX_PREPARING:
                    self._drain_clients()
                if self.preparer.ready:  # (prepared on the loop just now)
                    self._submit_prepared()
                if self.engine.pollable in events and self.engine_failure is None:
                    self._drain_engine()
                if self.engine_failure is None:
                    self._refresh_stats()
                    self._check_engine()
        finally:
            self.close()
        return 0 if self.engine_failure is None else 1

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        self.engine.shutdown("the server stopped")
        self.preparer.close()
        self.connections.close()
        self.router.close(linger=0)
        self.ctx.term()

    def _check_engine(self) -> None:
        if (failure := self.engine.failure()) is not None:
            self._engine_failed(failure)

    def _engine_failed(self, reason: str) -> None:
        """Every request in flight fails with the reason, the engine's processes are stopped, and
        the server stays up to say so (health: engine_dead) until it is stopped."""
        self.engine_failure = failure_summary(reason, log)
        self.requests.end_all(f"the engine failed: {self.engine_failure}", code="engine_error")
        self.engine.shutdown(f"it failed: {self.engine_failure}")

    def _abort(self, engine_ids: list[str]) -> None:
        """Asks the engine to stop these completions (none once it failed; it may be stopping)."""
        if engine_ids and self.engine_failure is None:
            try:
                self.engine.send(AbortRequests(engine_ids))
            except Exception:  # (the engine is stopping too)
                pass

    # ---- client side --------------------------------------------------------------------------

    def _send(self, identity: bytes, msg) -> bool:
        try:
            self.router.send_multipart([identity, server_encoder.encode(msg)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # unroutable (client gone) or its queue is full
            return False

    def _drop_gone_clients(self) -> None:
        for c in self.connections.gone():
            self.counters["clients_disconnected"] += 1
            self.requests.client_gone(c)

    def _drain_clients(self) -> None:
        while self.preparer.pending < MAX_PREPARING:
            try:
                frames = self.router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity, payload = frames[0].bytes, frames[-1]
            client, departed = self.connections.client(identity, payload.get(zmq.SRCFD))
            if departed is not None:  # the identity's earlier connection is gone: its requests end first
                self.requests.client_gone(departed)
            try:
                self._on_frame(client, payload.bytes)
            except Exception:  # a defect of ours, not the client's: that frame fails, the loop serves on
                log.exception("a client frame could not be handled")
                self._send(identity, Error("internal_error", "the server could not handle this message "
                                           f"({traceback.format_exc().strip().splitlines()[-1]})", None))
            self.connections.release_if_idle(client)

    def _on_frame(self, client: ClientState, payload: bytes) -> None:
        try:
            msg = server_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
            # (RecursionError: msgspec stops at the interpreter's depth limit in a value it skips)
            self.counters["bad_messages"] += 1
            self._send(client.identity, Error("bad_message", f"cannot read the message: {e}",
                                              request_id_of(payload)))
            return
        if isinstance(msg, Generate):
            self._on_generate(client, msg)
        elif isinstance(msg, Abort):
            self._on_abort(client, msg)
        elif isinstance(msg, Health):
            self._send(client.identity, self._health())
        elif isinstance(msg, GetModelInfo):
            r, c = self.engine.ready, self.config
            self._send(client.identity, ModelInfo(self.model_name, PROTOCOL_VERSION, r.max_model_len, r.vocab_size,
                                                  r.block_size, r.kv_cache_tokens, c.max_num_seqs,
                                                  c.max_num_batched_tokens, c.dtype))

    def _health(self) -> HealthReply:
        s = self.latest_stats
        status = "engine_dead" if self.engine_failure else "ok" if self._stop_at is None else "shutting_down"
        return HealthReply(status, s.num_running if s else 0, s.num_waiting if s else 0,
                           self.engine_failure or "", round(time.monotonic() - self.stats_time, 3))

    def _on_generate(self, client: ClientState, msg: Generate) -> None:
        self.counters["requests_received"] += 1
        rid = msg.request_id
        if self.engine_failure is not None:
            self._send(client.identity, Error("engine_error", f"the engine failed: {self.engine_failure}", rid))
            return
        if self._stop_at is not None:
            self._send(client.identity, Error("shutting_down", "the server is stopping and takes no new requests",
                                              rid))
            return
        if rid in client.requests:
            self._send(client.identity, Error("duplicate_request_id", f"request id {rid!r} is still running", rid))
            return
        refusal = self.limits.refusal(client.completions, client.prompt_tokens, 1, 0)
        if refusal is not None:  # (counted as one completion while it is prepared)
            self._refuse(client, rid, refusal)
            return
        s = Served(client, rid, msg.stream, time.time(), priority=msg.priority)
        client.requests[rid] = s
        client.completions += 1
        self.preparer.submit(s, msg)

    def _refuse(self, client: ClientState, rid: str, why: str) -> None:
        self.counters["requests_refused_by_limits"] += 1
        self._send(client.identity, Error("limit_exceeded", why, rid))

    def _submit_prepared(self) -> None:
        for s, result in self.preparer.take():
            client = s.client
            client.completions -= 1
            if client.requests.get(s.request_id) is not s:
                continue  # the client went while it was prepared
            if isinstance(result, Exception):
                message = str(result) if isinstance(result, RequestInputError) else \
                    f"the request could not be prepared ({type(result).__name__}: {result})"
                self.requests.finish(s, Error("invalid_request", message, s.request_id))
            elif self.engine_failure is not None:
                why = f"the engine failed: {self.engine_failure}"
                self.requests.finish(s, Error("engine_error", why, s.request_id))
            elif s.aborted:
                self.requests.finish(s, Final(s.request_id, "abort", "", [], Usage(0, 0), Timing(0.0, 0.0, 0.0)))
            else:
                self._start(s, *result)
            self.connections.release_if_idle(client)

    def _start(self, s: Served, ids: list[int], params: SamplingParams) -> None:
        client, n = s.client, len(completion_ids("x", params.n))
        refusal = self.limits.refusal(client.completions, client.prompt_tokens, n, len(ids))
        if refusal is not None:
            client.requests.pop(s.request_id, None)
            self._refuse(client, s.request_id, refusal)
            return
        self.engine.send(self.requests.start(s, ids, params))

    def _on_abort(self, client: ClientState, msg: Abort) -> None:
        s = client.requests.get(msg.request_id)
        if s is None:
            self._send(client.identity, Error("unknown_request", f"no unfinished request {msg.request_id!r}",
                                              msg.request_id))
        elif s.preparing:
            s.aborted = True  # answered when its preparation is done
        else:
            self.engine.send(AbortRequests(self.requests.unfinished_ids(s)))  # its Final comes back

    # ---- engine side --------------------------------------------------------------------------

    def _drain_engine(self) -> None:
        while (msg := self.engine.poll()) is not None:
            if isinstance(msg, RequestOutputs):
                self._drop_gone_clients()  # no output goes to an identity whose connection is gone
                for d in msg.deltas:
                    self.requests.on_delta(d)
            elif isinstance(msg, EngineStats):
                with self._lock:
                    self.latest_stats, self.stats_time = msg, time.monotonic()
            elif isinstance(msg, EngineDead):
                self._engine_failed(msg.reason)
                return

    def _refresh_stats(self) -> None:
        now = time.monotonic()
        if now >= self._stats_due:
            self._stats_due = now + STATS_INTERVAL_S
            self.engine.send(GetStats())

    def stats_snapshot(self) -> tuple[EngineStats | None, dict[str, int], HealthReply]:
        with self._lock:
            return self.latest_stats, dict(self.counters), self._health()
