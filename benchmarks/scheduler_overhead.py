"""Scheduler cost per step with the model replaced by a no-op worker process, ZeroMQ round trip
included: the engine core plans, sends the plan, the worker applies it (WorkerState) and answers
with one token per due request, and the core folds the result back in. Measured with
asynchronous scheduling (the engine's default: the next step is planned and sent before the
last one's result is folded in) and, as the peer in the same run, without. With --spec K the
engine speculates with up to K MTP drafts: the no-op worker proposes as many as each plan asks
and accepts them all (the most verification work a step can fold in).

    .venv/bin/python benchmarks/scheduler_overhead.py --running 256 [--spec 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# This folder holds kernels.py, which would shadow the kernels package: the repo root goes first.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import zmq

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.messages import AddRequest, SchedulerToWorker, Shutdown, StepResult, WorkerReady
from engine.processes import Channel, become_child_process, spawn
from engine.remote_workers import RemoteWorkers
from engine.sampling_params import SamplingParams
from engine.worker_state import WorkerState


def noop_worker(plan_addr: str, result_addr: str, spec: int = 0) -> None:
    become_child_process()
    ctx = zmq.Context()
    plans = Channel(ctx, zmq.PULL, plan_addr, bind=False, decode_type=SchedulerToWorker)
    results = Channel(ctx, zmq.PUSH, result_addr, bind=False, decode_type=None)
    state = WorkerState()
    while not isinstance(plan := plans.recv(), Shutdown):
        work = state.apply(plan)
        sampled = {w.req.req_id: w.tokens[w.num_known:] + [7] for w in work if w.samples}
        drafts = {rid: [7] * w.propose for w in work if (rid := w.req.req_id) in sampled} if spec else None
        # As the model worker does: the result goes out before the worker's own bookkeeping.
        results.send(StepResult(plan.step_id, list(sampled), list(sampled.values()),
                                [drafts[r] for r in sampled] if spec else []))
        WorkerState.advance(work, sampled, drafts)


def measure(args: argparse.Namespace, pipelined: bool) -> float:
    """Seconds per step with 256 (--running) decoding requests."""
    d = tempfile.mkdtemp()
    ctx = zmq.Context()
    plans = Channel(ctx, zmq.PUSH, f"ipc://{d}/plans", bind=True, decode_type=None)
    results = Channel(ctx, zmq.PULL, f"ipc://{d}/results", bind=True, decode_type=StepResult)
    # (by its module's name: the child process cannot import this script's __main__)
    from benchmarks.scheduler_overhead import noop_worker as importable_worker

    proc = spawn(importable_worker, f"ipc://{d}/plans", f"ipc://{d}/results", args.spec)
    try:
        cfg = EngineConfig(model_dir="-", block_size=64, max_num_batched_tokens=8192, max_num_seqs=args.running,
                           async_scheduling=pipelined, num_speculative_tokens=args.spec)
        tokens = (args.prompt_len + (args.spec + 1) * args.steps + 64) * args.running
        core = EngineCore(cfg, [WorkerReady(0, tokens // 64 + args.running, 0, 1000, 1 << 20)], None,
                          RemoteWorkers([plans], results))
        big = SamplingParams(max_tokens=(args.spec + 1) * args.steps + 10, ignore_eos=True)
        for i in range(args.running):
            core.add(AddRequest(str(i), [2 + i % 50] * args.prompt_len, big))
        while len(core.scheduler.running) < args.running or any(
                r.num_computed < r.num_prompt_tokens for r in core.scheduler.running):
            core.step()
        start = time.perf_counter()
        for _ in range(args.steps):
            core.step()
        per_step = (time.perf_counter() - start) / args.steps
        plans.send(Shutdown())
        return per_step
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
        plans.close()
        results.close()
        ctx.term()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--running", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--spec", type=int, default=0, help="MTP drafts per step (0: no speculation)")
    args = ap.parse_args()
    # The peer, measured in the same run: the same core planning each step only after the last
    # one's result is in.
    for pipelined in (True, False):
        per_step = measure(args, pipelined)
        mode = "next step planned while one runs" if pipelined else "each step planned after the last returns"
        spec = f", {args.spec} drafts a request verified per step" if args.spec else ""
        print(f"{args.running} running requests{spec}, {mode}: {per_step * 1e3:.3f} ms per step "
              f"({1 / per_step:.0f} steps/s), ZeroMQ round trip to a no-op worker included")


if __name__ == "__main__":
    main()
