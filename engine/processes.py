"""Process plumbing: ZMQ sockets with msgspec codecs, child processes that die with their parent."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
from typing import Any

import msgspec
import zmq

PR_SET_PDEATHSIG = 1


def become_child_process() -> None:
    """Called first in every child: die with the parent (even on SIGKILL), leave Ctrl-C to it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the parent's shutdown and daemon flag still stop us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() == 1:
        os._exit(1)  # the parent died before prctl took effect


class Channel:
    """One ZMQ socket that sends and receives typed messages."""

    def __init__(self, ctx: zmq.Context, kind: int, addr: str, bind: bool, decode_type: Any):
        self.socket = ctx.socket(kind)
        self.socket.setsockopt(zmq.LINGER, 0)
        if bind:
            self.socket.bind(addr)
        else:
            self.socket.connect(addr)
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(decode_type)

    def send(self, msg: msgspec.Struct) -> None:
        self.socket.send(self._enc.encode(msg), copy=False)

    def recv(self, timeout_ms: int | None = None):
        """The next message, or None if none arrives within timeout_ms."""
        if timeout_ms is not None and not self.socket.poll(timeout_ms):
            return None
        return self._dec.decode(self.socket.recv(copy=False))

    def close(self) -> None:
        self.socket.close(linger=0)


def spawn(target, *args) -> mp.Process:
    proc = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc
