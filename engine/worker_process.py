"""The worker process: receives step plans, runs them, returns sampled tokens."""

from __future__ import annotations

import os
import traceback

import zmq

from engine.config import EngineConfig
from engine.messages import (
    HEARTBEAT_INTERVAL_S,
    SchedulerToWorker,
    Shutdown,
    WorkerFailed,
    WorkerHeartbeat,
    WorkerReady,
)
from engine.processes import Channel, Heartbeat, become_child_process

# After this long without a plan the worker returns its scratch buffers and free heap pages.
IDLE_RELEASE_MS = 1000
OPENMP_SPIN_COUNT = 30000


def run_worker(config: EngineConfig, rank: int, plan_addr: str, result_addr: str) -> None:
    become_child_process()
    if not config.cpu_threads and not (os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT")):
        # Before torch (and its OpenMP runtime, libgomp) loads: an idle OpenMP thread spins for
        # about 0.5-0.9 ms, then sleeps (libgomp's default, 300000, spins ~7 ms: through every
        # small step), so that a step run on fewer threads than the last (engine/step_threads.py)
        # leaves the other cores to the scheduler and the frontend, while a step's regions still
        # find their threads awake. Measured on 2 cores: a 1-thread batch-1 step of the demo
        # model after 2-thread ones took 0.83 ms with them spinning, 0.56 ms without; batch-1
        # decode 1536-1561 tok/s against 1313-1385 with the default (docs/cpu_kernels.md); the
        # `small` model's throughput was 10% higher than with no spinning (OMP_WAIT_POLICY=PASSIVE).
        os.environ["GOMP_SPINCOUNT"] = str(OPENMP_SPIN_COUNT)
    ctx = zmq.Context()
    plans = Channel(ctx, zmq.PULL, plan_addr, bind=False, decode_type=SchedulerToWorker)
    results = Channel(ctx, zmq.PUSH, result_addr, bind=False, decode_type=None)
    heartbeat = None
    try:
        from engine.model_runner import ModelRunner  # torch loads here, in the worker only

        runner = ModelRunner(config, rank)
        tiers = runner.tiers
        results.send(WorkerReady(rank, runner.num_blocks, runner.kv_bytes_per_token, runner.cfg.vocab_size,
                                 runner.max_model_len, runner.step_peak_bytes,
                                 host_blocks=tiers.host_blocks if tiers else 0,
                                 disk_blocks=tiers.disk_blocks if tiers else 0,
                                 disk_keys=tiers.existing_blocks() if tiers else []))
        heartbeat = Heartbeat(ctx, result_addr, WorkerHeartbeat(rank), HEARTBEAT_INTERVAL_S)
        busy_since_release = False
        while True:
            msg = plans.recv(timeout_ms=IDLE_RELEASE_MS)
            if msg is None:  # idle: hand step-sized scratch memory back, once per busy spell
                if busy_since_release:
                    runner.release_idle_memory()
                    busy_since_release = False
                continue
            if isinstance(msg, Shutdown):
                runner.close()
                break
            runner.execute(msg, publish=results.send)
            busy_since_release = True
    except Exception:
        results.send(WorkerFailed(rank, traceback.format_exc()))
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        plans.close()
        results.close()
        ctx.term()


def run_node_workers(config: EngineConfig, poll_s: float = 0.5) -> int:
    """`mlaserve worker`: this host's expert-parallel workers (node_rank > 0), joined to the
    scheduler on master_addr over tcp. Returns when they end (the scheduler sends Shutdown), or
    stops them all when one fails or this process gets SIGTERM / Ctrl-C."""
    import signal
    import time

    from engine.processes import spawn

    if config.nnodes < 2 or config.node_rank == 0:
        raise ValueError("`mlaserve worker` runs the workers of node_rank >= 1 of nnodes >= 2 "
                         "(node 0 runs `mlaserve serve` or the offline API)")
    links = config.worker_links(bind=False)
    procs = [spawn(run_worker, config, r, links[f"plans{r}"], links["results"]) for r in config.local_ranks]
    stop = []
    old = signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while not stop and any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    return max((p.exitcode or 0) != 0 for p in procs) if not stop else 0
