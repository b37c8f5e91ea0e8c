"""Process plumbing: ZMQ sockets with msgspec codecs, child processes that die with their parent."""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import subprocess
import sys
import threading
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


class ChildProcess:
    """An engine process: a fresh interpreter that runs `target(*args)` (the mp.Process calls the
    frontend uses: is_alive, exitcode, join, kill, name, pid). Unlike multiprocessing's spawn, it
    never re-imports the parent's main module, so a script without an `if __name__ ==
    "__main__":` guard starts the engine once, as vLLM's quickstart does; the target and its
    arguments travel pickled on the child's stdin, with the parent's import path."""

    def __init__(self, target, args: tuple, name: str):
        self.name = name
        payload = pickle.dumps((list(sys.path), target, args))
        self._popen = subprocess.Popen([sys.executable, "-c", "from engine.processes import run_child; run_child()"],
                                       stdin=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                           p for p in sys.path if p)})
        self.pid = self._popen.pid
        try:
            self._popen.stdin.write(payload)
            self._popen.stdin.close()
        except BrokenPipeError:
            pass  # it died at once: is_alive and exitcode say so

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()


def run_child() -> None:
    """The child's side of ChildProcess."""
    path, target, args = pickle.loads(sys.stdin.buffer.read())
    sys.path[:0] = [p for p in path if p not in sys.path]
    target(*args)


_spawned = 0


def spawn(target, *args) -> ChildProcess:
    global _spawned
    _spawned += 1
    return ChildProcess(target, args, f"{target.__name__}-{_spawned}")


class Heartbeat:
    """A process's sign of life: `msg` sent every `interval_s` on a socket of its own thread
    (sockets are not shared between threads). It keeps beating while the process's main thread
    runs a long step (torch's kernels release the interpreter); a stopped or hung process sends
    none. A full queue (nobody reading) drops beats rather than block."""

    def __init__(self, ctx: zmq.Context, addr: str, msg: msgspec.Struct, interval_s: float):
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, args=(ctx, addr, msgspec.msgpack.encode(msg)),
                                        name="mlaserve-heartbeat", daemon=True)
        self._thread.start()

    def _run(self, ctx: zmq.Context, addr: str, beat: bytes) -> None:
        out = Channel(ctx, zmq.PUSH, addr, bind=False, decode_type=None)
        try:
            while not self._stop.wait(self._interval_s):
                try:
                    out.socket.send(beat, zmq.NOBLOCK)
                except zmq.Again:
                    pass
        finally:
            out.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self._interval_s)
