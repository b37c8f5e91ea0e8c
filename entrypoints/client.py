"""Client library for `mlaserve serve` (protocol: docs/protocol.md).

    with Client("tcp://127.0.0.1:5555") as c:
        for ev in c.generate("Hello", params={"max_tokens": 16}):   # Delta..., then Final
            print(ev.text, end="")
        final = c.complete("Hello", params={"max_tokens": 16})     # one Final

    async with AsyncClient("tcp://127.0.0.1:5555") as c:           # many requests at once
        async for ev in c.generate("Hello"): ...

A server-side error raises ServerError(code, message). A request that hears nothing for
`timeout_s` is aborted on the server and raises TimeoutError. `reconnect()` opens a fresh
socket (a new identity); `health()` reconnects once by itself before giving up.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from entrypoints.protocol import (
    Abort,
    Delta,
    Error,
    Final,
    Generate,
    GetModelInfo,
    Health,
    HealthReply,
    ModelInfo,
    client_decoder,
    client_encoder,
)


class ServerError(RuntimeError):
    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


def _params(params) -> dict[str, Any]:
    if params is None:
        return {}
    if isinstance(params, dict):
        return params
    return msgspec.structs.asdict(params)  # a SamplingParams


def _generate_msg(prompt, prompt_token_ids, params, request_id, stream, priority) -> Generate:
    if isinstance(prompt, list):
        prompt, prompt_token_ids = None, prompt
    raw = msgspec.Raw(msgspec.msgpack.encode(_params(params)))
    return Generate(request_id or uuid.uuid4().hex, prompt, prompt_token_ids, raw, stream, priority)


class Client:
    """Blocking client: one request at a time per Client (use AsyncClient for concurrency)."""

    def __init__(self, address: str, timeout_s: float = 60.0):
        self.address = address
        self.timeout_s = timeout_s
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self.reconnect()

    def reconnect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.address)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._ctx.term()

    def drop_connection(self) -> None:
        """Vanish without a word, as a crashed client would (for tests of the server)."""
        self._sock.close(linger=0)
        self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send_raw(self, payload: bytes) -> None:
        """For tests and other languages' conformance checks: any bytes as one frame."""
        self._sock.send(payload)

    def _send(self, msg) -> None:
        self._sock.send(client_encoder.encode(msg))

    def recv(self, timeout_s: float | None = None):
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if not self._sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no message from {self.address} within {timeout} s")
        return client_decoder.decode(self._sock.recv())

    def generate(self, prompt: str | list[int] | None = None, params=None, *, prompt_token_ids=None,
                 request_id: str | None = None, stream: bool = True, timeout_s: float | None = None,
                 priority: int = 0) -> Iterator[Delta | Final]:
        msg = _generate_msg(prompt, prompt_token_ids, params, request_id, stream, priority)
        self._send(msg)
        done = False
        try:
            while True:
                ev = self.recv(timeout_s)
                if getattr(ev, "request_id", msg.request_id) != msg.request_id:
                    continue  # a late message of an earlier, abandoned request
                if isinstance(ev, Error):
                    done = True
                    raise ServerError(ev.code, ev.message, ev.request_id)
                if isinstance(ev, Final):
                    done = True
                yield ev
                if done:
                    return
        finally:
            if not done and self._sock is not None:  # timed out, or the caller stopped iterating
                self._send(Abort(msg.request_id))  # frees the server's blocks now

    def complete(self, prompt=None, params=None, **kw) -> Final:
        for ev in self.generate(prompt, params, stream=False, **kw):
            if isinstance(ev, Final):
                return ev
        raise ServerError("engine_error", "the stream ended without a Final")

    def abort(self, request_id: str) -> None:
        self._send(Abort(request_id))

    def _control(self, msg, want: type, timeout_s: float | None):
        self._send(msg)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while (left := deadline - time.monotonic()) > 0:
            ev = self.recv(left)
            if isinstance(ev, want):
                return ev
            if isinstance(ev, Error) and ev.request_id is None:
                raise ServerError(ev.code, ev.message)
        raise TimeoutError(f"no {want.__name__} from {self.address}")

    def health(self, timeout_s: float = 5.0) -> HealthReply:
        try:
            return self._control(Health(), HealthReply, timeout_s)
        except TimeoutError:
            self.reconnect()
            return self._control(Health(), HealthReply, timeout_s)

    def model_info(self, timeout_s: float | None = None) -> ModelInfo:
        return self._control(GetModelInfo(), ModelInfo, timeout_s)


class AsyncClient:
    """asyncio client: any number of concurrent requests over one socket."""

    def __init__(self, address: str, timeout_s: float = 60.0):
        self.address = address
        self.timeout_s = timeout_s
        self._ctx = zmq.asyncio.Context()
        self._sock = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._control: asyncio.Queue = asyncio.Queue()
        self._reader: asyncio.Task | None = None
        self._ids = itertools.count()
        self.reconnect()

    def reconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.address)

    async def close(self) -> None:
        if self._ctx.closed:
            return
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._ctx.term()

    def drop_connection(self) -> None:
        """Vanish without a word, as a crashed client would (for tests of the server)."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._sock.close(linger=0)
        self._sock = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            ev = client_decoder.decode(await self._sock.recv())
            rid = getattr(ev, "request_id", None)
            q = self._queues.get(rid) if rid is not None else None
            await (q if q is not None else self._control).put(ev)

    async def _send(self, msg) -> None:
        await self._sock.send(client_encoder.encode(msg))

    async def generate(self, prompt: str | list[int] | None = None, params=None, *, prompt_token_ids=None,
                       request_id: str | None = None, stream: bool = True, timeout_s: float | None = None,
                       priority: int = 0) -> AsyncIterator[Delta | Final]:
        msg = _generate_msg(prompt, prompt_token_ids, params, request_id or f"a{next(self._ids)}", stream,
                            priority)
        if msg.request_id in self._queues:
            raise ValueError(f"request id {msg.request_id!r} is already in flight on this client")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[msg.request_id] = q
        self._ensure_reader()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        done = False
        try:
            await self._send(msg)
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"no message for {msg.request_id!r} within {timeout} s") from None
                if isinstance(ev, Error):
                    done = True
                    raise ServerError(ev.code, ev.message, ev.request_id)
                done = isinstance(ev, Final)
                yield ev
                if done:
                    return
        finally:
            self._queues.pop(msg.request_id, None)
            if not done and self._sock is not None:
                await self._send(Abort(msg.request_id))

    async def complete(self, prompt=None, params=None, **kw) -> Final:
        async for ev in self.generate(prompt, params, stream=False, **kw):
            if isinstance(ev, Final):
                return ev
        raise ServerError("engine_error", "the stream ended without a Final")

    async def abort(self, request_id: str) -> None:
        await self._send(Abort(request_id))

    async def _ask(self, msg, want: type, timeout_s: float | None):
        self._ensure_reader()
        await self._send(msg)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = await asyncio.wait_for(self._control.get(), left)
            except asyncio.TimeoutError:
                break
            if isinstance(ev, want):
                return ev
            if isinstance(ev, Error):
                raise ServerError(ev.code, ev.message)
        raise TimeoutError(f"no {want.__name__} from {self.address}")

    async def health(self, timeout_s: float = 5.0) -> HealthReply:
        try:
            return await self._ask(Health(), HealthReply, timeout_s)
        except TimeoutError:
            self.reconnect()
            return await self._ask(Health(), HealthReply, timeout_s)

    async def model_info(self, timeout_s: float | None = None) -> ModelInfo:
        return await self._ask(GetModelInfo(), ModelInfo, timeout_s)
