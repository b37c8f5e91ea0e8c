"""What the heaviest requests the protocol allows cost everyone else, and how fast the watchdog is.

    .venv/bin/python benchmarks/hostile_input.py [--rounds 2]

Starts `mlaserve serve` on the tiny checkpoint and, in turns, streams a few greedy "bystander"
requests alone and beside heavy requests (128 stop strings of 140 characters and 1024 bad words
each: the schema's limits). It prints the bystanders' output tokens per second and worst gap
between tokens in both cases, and their ratio. Then it stops the worker with SIGSTOP under a
streaming request and prints the time until the client's error (the watchdog's bound).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entrypoints.client import Client, ServerError
from entrypoints.protocol import Delta, Final
from model.checkpoint_maker import make_checkpoint
from tests.server_util import RunningServer

BYSTANDER = {"max_tokens": 100, "ignore_eos": True, "temperature": 0.0}
HEAVY = {"ignore_eos": True, "stop": [f"never{i}" * 20 for i in range(128)],
         "bad_words": [f"w{i}" for i in range(1024)]}


def stream(address: str, prompt: str, out: list) -> None:
    times = []
    with Client(address, timeout_s=300) as c:
        for ev in c.generate(prompt, BYSTANDER):
            if isinstance(ev, Delta) and ev.token_ids:
                times.append(time.monotonic())
            elif isinstance(ev, Final):
                out.append(times)


def crowd(address: str, n: int, params: dict, done: threading.Event) -> None:
    """n requests with params, running until `done`, then aborted."""
    with Client(address, timeout_s=300) as c:
        for i in range(n):
            c.send_raw(msgspec.msgpack.encode({"type": "generate", "request_id": f"c{i}", "prompt": f"crowd {i}",
                                               "params": {**params, "max_tokens": 1000}, "stream": False}))
        done.wait()
        for i in range(n):
            c.send_raw(msgspec.msgpack.encode({"type": "abort", "request_id": f"c{i}"}))
        finals = 0
        while finals < n:
            finals += isinstance(c.recv(), Final)


def bystanders(address: str, beside: int, params: dict) -> tuple[float, float]:
    done = threading.Event()
    others = threading.Thread(target=crowd, args=(address, beside, params, done)) if beside else None
    if others:
        others.start()
        time.sleep(1.0)
    out: list = []
    threads = [threading.Thread(target=stream, args=(address, f"bystander {i}", out)) for i in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    done.set()
    if others:
        others.join()
    tokens = sum(len(t) for t in out)
    worst = max(b - a for t in out for a, b in zip(t, t[1:]))
    return tokens / elapsed, worst


def watchdog(ckpt: Path, timeout_s: float) -> float:
    s = RunningServer(ckpt, "--worker-heartbeat-timeout", str(timeout_s))
    try:
        with Client(s.address, timeout_s=120) as c:
            st = c.generate("watch", {"max_tokens": 3000, "ignore_eos": True})
            next(st)
            os.kill(max(s.children), signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                list(st)
            except ServerError as e:
                assert e.code == "engine_error", e
            return time.monotonic() - t0
    finally:
        s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--heavy", type=int, default=8, help="heavy requests beside the bystanders")
    args = ap.parse_args()
    ckpt = make_checkpoint("tiny", 0, Path(tempfile.mkdtemp(prefix="hostile-")))
    server = RunningServer(ckpt)
    try:
        cases = {"alone": (0, {}), f"beside {args.heavy} plain requests": (args.heavy, {"ignore_eos": True}),
                 f"beside {args.heavy} heavy requests": (args.heavy, HEAVY)}
        runs: dict[str, list] = {k: [] for k in cases}
        for _ in range(args.rounds):  # alternated, so that the machine's drift falls on every case
            for name, (n, params) in cases.items():
                runs[name].append(bystanders(server.address, n, params))
    finally:
        server.stop()
    tok_s = {}
    for name, rs in runs.items():
        tok_s[name] = statistics.median(r[0] for r in rs)
        print(f"bystanders {name}: {tok_s[name]:.1f} tok/s, worst gap between tokens "
              f"{max(r[1] for r in rs) * 1000:.0f} ms")
    plain, heavy = list(tok_s.values())[1:]
    print(f"heavy / plain neighbours: {heavy / plain:.2f} of the bystanders' throughput")
    for limit in (5.0,):
        print(f"watchdog: SIGSTOP of the worker to the client's error: {watchdog(ckpt, limit):.2f} s "
              f"(--worker-heartbeat-timeout {limit:g})")


if __name__ == "__main__":
    main()
