"""The worker process: receives step plans, runs them, returns sampled tokens."""

from __future__ import annotations

import traceback

import zmq

from engine.config import EngineConfig
from engine.messages import SchedulerToWorker, Shutdown, WorkerFailed, WorkerReady
from engine.processes import Channel, become_child_process


def run_worker(config: EngineConfig, rank: int, plan_addr: str, result_addr: str) -> None:
    become_child_process()
    ctx = zmq.Context()
    plans = Channel(ctx, zmq.PULL, plan_addr, bind=False, decode_type=SchedulerToWorker)
    results = Channel(ctx, zmq.PUSH, result_addr, bind=False, decode_type=None)
    try:
        from engine.model_runner import ModelRunner  # torch loads here, in the worker only

        runner = ModelRunner(config)
        results.send(WorkerReady(rank, runner.num_blocks, runner.kv_bytes_per_token, runner.cfg.vocab_size,
                                 runner.max_model_len))
        while True:
            msg = plans.recv()
            if isinstance(msg, Shutdown):
                break
            results.send(runner.execute(msg))
    except Exception:
        results.send(WorkerFailed(rank, traceback.format_exc()))
    finally:
        plans.close()
        results.close()
        ctx.term()
