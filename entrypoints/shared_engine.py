"""The engine as a second frontend on its own thread sees it, when one AsyncLLM serves HTTP and
the ZeroMQ endpoint runs beside it (`serve --http-port P --port Q`).
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING

import zmq

from engine.processes import Channel
from entrypoints.engine_client import EngineDeadError

if TYPE_CHECKING:
    from entrypoints.async_llm import AsyncLLM


class SharedEngine:
    """The engine as a second frontend on a thread of its own (the ZeroMQ server beside the HTTP
    one) sees it: EngineClient's interface, with its own socket to the scheduler and, handed over
    by the serving loop through a queue and a pipe to poll, the messages for its requests (engine
    ids starting with `prefix`), every stats answer and the engine's failure."""

    def __init__(self, llm: AsyncLLM, prefix: str):
        self.llm, self.prefix, self.ready = llm, prefix, llm.ready
        self._queue: deque = deque()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._push: Channel | None = None  # made by the first send, on the sending thread

    @property
    def pollable(self) -> int:
        return self._read_fd

    def deliver(self, msg) -> None:
        self._queue.append(msg)
        try:
            os.write(self._write_fd, b"x")
        except BlockingIOError:
            pass  # wake-ups pending already

    def poll(self, timeout_ms: int = 0):
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        return self._queue.popleft() if self._queue else None

    def send(self, msg) -> None:
        if self.llm.failure is not None or self.llm.engine.stopped is not None:
            raise EngineDeadError(f"the engine is stopped ({self.llm.failure or self.llm.engine.stopped})")
        if self._push is None:
            self._push = Channel(self.llm.engine._ctx, zmq.PUSH, self.llm.engine.input_addr, bind=False,
                                 decode_type=None)
        self._push.send(msg)

    def failure(self) -> str | None:
        return self.llm.failure

    def shutdown(self, why: str = "") -> None:
        """Closes this frontend's side; the engine is its owner's to stop."""
        if self._push is not None:
            self._push.close()
            self._push = None
