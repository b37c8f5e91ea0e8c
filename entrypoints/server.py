"""`mlaserve serve`: a ZeroMQ ROUTER endpoint in front of the engine, plus Prometheus metrics, as
an adapter over the asynchronous engine client (entrypoints/async_llm.py).

Everything that touches a socket runs on one event loop: client frames are read when the
ROUTER's descriptor signals, requests go to the engine through AsyncLLM.submit, and each fold
it hands back becomes that client's Delta or Final. The Prometheus HTTP thread only reads a
snapshot. Every client error is a typed Error for that request; nothing a client sends can stop
the loop. With the HTTP API (`serve --http-port P --port Q`) both run on uvicorn's loop over one
AsyncLLM.

Lifecycle: SIGTERM/SIGINT stop intake (new Generate -> Error "shutting_down"), let in-flight
requests finish for up to `shutdown_grace_s`, abort what is left, stop the engine processes and
return 0. A request whose client has gone (ZeroMQ cannot route to it any more) is aborted at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import traceback
from pathlib import Path

import msgspec
import zmq

from engine.config import EngineConfig
from engine.messages import (
    EngineStats,
    completion_ids,
)
from engine.request_input import RequestInputError
from engine.sampling_params import SamplingParams
from entrypoints.async_llm import AsyncLLM
from entrypoints.connections import ClientLimits, ClientState, Connections, open_router
from entrypoints.metrics import start_metrics_server
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

WATCH_INTERVAL_S = 0.05  # how often a stop's progress is checked and the sockets read in case an edge was missed
MAX_PREPARING = 64  # requests being prepared at once; past it the loop reads no more frames until some finish


class Server:
    def __init__(self, config: EngineConfig, host: str = "127.0.0.1", port: int = 5555,
                 metrics_port: int | None = None, shutdown_grace_s: float = 30.0, model_name: str | None = None,
                 metrics_host: str = "127.0.0.1", max_completions_per_client: int | None = None,
                 max_prompt_tokens_per_client: int | None = None, llm: AsyncLLM | None = None):
        """`llm`: the engine as another frontend already runs it (the HTTP API beside this one);
        None starts the engine here."""
        self.config = config
        self.grace_s = shutdown_grace_s
        self.model_name = model_name or Path(config.model_dir).name
        self.owns_engine = llm is None
        self.llm = llm if llm is not None else AsyncLLM(config)
        ready = self.llm.ready
        # One connection may hold half the engine's batch and its whole cache's worth of prompt
        # by default: enough for a load generator on one socket, and never every slot.
        self.limits = ClientLimits(
            max_completions_per_client or max(1, config.max_num_seqs * config.ep_size // 2),
            max_prompt_tokens_per_client or ready.kv_cache_tokens)
        self.preparer = Preparer(self.llm.tokenizer, ready.max_model_len, ready.vocab_size, self.llm.grammars)
        self.ctx = zmq.Context()
        self.router, self.port = open_router(self.ctx, host, port)
        self.connections = Connections(self.router)
        self.address = f"tcp://{host}:{self.port}"
        self.requests = ServedRequests(self.llm, self.connections, self._send)
        self.counters = {"requests_received": 0, "bad_messages": 0, "requests_refused_by_limits": 0,
                         "clients_disconnected": 0}
        self._stop_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._throttled = False  # frames were left unread for want of room to prepare them
        self.metrics_server = start_metrics_server(self, metrics_host, metrics_port) \
            if metrics_port is not None else None

    @property
    def engine_failure(self) -> str | None:
        return self.llm.failure

    # ---- lifecycle ----------------------------------------------------------------------------

    def serve_forever(self, install_signals: bool = True) -> int:
        """Serves on a loop of its own until stopped. Returns 0 after a clean stop, 1 when the
        engine had failed (the server stays up until then to answer health with the reason)."""
        loop = asyncio.new_event_loop()
        try:
            if self.owns_engine:
                self.llm.start(loop)
            self.start(loop)
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self.request_stop)
            loop.run_until_complete(self.stopped())
        finally:
            self.close()
            loop.close()
        return 0 if self.engine_failure is None else 1

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begins serving on `loop` (the AsyncLLM's; call on it)."""
        self._loop = loop
        self._stopped = loop.create_future()
        loop.add_reader(self.router.getsockopt(zmq.FD), self._drain_clients)
        loop.add_reader(self.connections.monitor.getsockopt(zmq.FD), self._drop_gone_clients)
        loop.add_reader(self.preparer.fd, self._submit_prepared)
        self.llm.before_outputs.append(self._drop_gone_clients)  # no output to an identity whose connection is gone
        self.llm.after_outputs.append(self._drain_clients)  # (a send may leave the ROUTER's readable edge unsignalled)
        self._timer = loop.call_soon(self._watch)

    def request_stop(self, *_sig) -> None:
        if self._stop_at is None:
            self._stop_at = time.monotonic() + self.grace_s
            self._check_stopped()

    async def stopped(self) -> None:
        """Returns once a requested stop is done: every request ended, or the grace period over."""
        await self._stopped

    def _watch(self) -> None:
        """Every WATCH_INTERVAL_S: the stop's progress, and the sockets read in case an edge was missed."""
        self._drop_gone_clients()
        self._drain_clients()
        self._check_stopped()
        if not self._stopped.done():
            self._timer = self._loop.call_later(WATCH_INTERVAL_S, self._watch)

    def _check_stopped(self) -> None:
        if self._stop_at is None or self._stopped is None or self._stopped.done():
            return
        if not self.requests and not self.preparer.pending:
            self._stopped.set_result(None)
        elif time.monotonic() >= self._stop_at:
            self.requests.end_all("the server is stopping and its grace period has ended")
            self._stopped.set_result(None)

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        if self._loop is not None and not self._loop.is_closed():
            for fd in (self.router.getsockopt(zmq.FD), self.connections.monitor.getsockopt(zmq.FD), self.preparer.fd):
                self._loop.remove_reader(fd)
            if self._timer is not None:
                self._timer.cancel()
        for hooks, hook in ((self.llm.before_outputs, self._drop_gone_clients),
                            (self.llm.after_outputs, self._drain_clients)):
            if hook in hooks:
                hooks.remove(hook)
        if self.owns_engine:
            self.llm.shutdown("the server stopped")
        self.preparer.close()
        self.connections.close()
        self.router.close(linger=0)
        self.ctx.term()

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
        """Reads every waiting frame while there is room to prepare requests (past MAX_PREPARING
        frames wait in the socket until preparations finish), then starts those prepared at once."""
        while True:
            if self.preparer.pending >= MAX_PREPARING:
                self._throttled = True
                break
            try:
                frames = self.router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            except zmq.ZMQError:  # (closed: the server is stopping)
                return
            self._on_frames(frames)
        if self.preparer.ready:
            self._submit_prepared()

    def _on_frames(self, frames) -> None:
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
            r, c = self.llm.ready, self.config
            self._send(client.identity, ModelInfo(self.model_name, PROTOCOL_VERSION, r.max_model_len, r.vocab_size,
                                                  r.block_size, r.kv_cache_tokens, c.max_num_seqs,
                                                  c.max_num_batched_tokens, c.dtype))

    def _health(self) -> HealthReply:
        s = self.llm.latest_stats
        status = "engine_dead" if self.engine_failure else "ok" if self._stop_at is None else "shutting_down"
        return HealthReply(status, s.num_running if s else 0, s.num_waiting if s else 0,
                           self.engine_failure or "", round(time.monotonic() - self.llm.stats_time, 3))

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
        if self._throttled and self.preparer.pending < MAX_PREPARING:  # frames waited for room: read them
            self._throttled = False
            self._loop.call_soon(self._drain_clients)

    def _start(self, s: Served, ids: list[int], params: SamplingParams) -> None:
        client, n = s.client, len(completion_ids("x", params.n))
        refusal = self.limits.refusal(client.completions, client.prompt_tokens, n, len(ids))
        if refusal is not None:
            client.requests.pop(s.request_id, None)
            self._refuse(client, s.request_id, refusal)
            return
        self.requests.start(s, ids, params)

    def _on_abort(self, client: ClientState, msg: Abort) -> None:
        s = client.requests.get(msg.request_id)
        if s is None:
            self._send(client.identity, Error("unknown_request", f"no unfinished request {msg.request_id!r}",
                                              msg.request_id))
        elif s.preparing:
            s.aborted = True  # answered when its preparation is done
        else:
            self.requests.abort(s)  # its Final comes back

    def stats_snapshot(self) -> tuple[EngineStats | None, dict[str, int], HealthReply]:
        # (from the metrics thread: the values it reads are replaced whole, never half-written)
        return self.llm.latest_stats, dict(self.counters), self._health()
