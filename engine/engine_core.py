"""The scheduler process: owns every request, plans each step, folds results back in.

EngineCore.step() is schedule -> execute on the worker -> update; run_engine_core() is the thin
ZMQ loop around it. No torch here.
"""

from __future__ import annotations

import time
import traceback

import zmq

from cache.block_manager import BlockManager
from engine.config import EngineConfig
from engine.messages import (
    AbortRequests,
    AddRequest,
    EngineDead,
    EngineReady,
    EngineStats,
    FrontendToScheduler,
    GetStats,
    RequestDelta,
    RequestOutputs,
    Shutdown,
    StepResult,
    WorkerFailed,
    WorkerReady,
    WorkerToScheduler,
)
from engine.metrics import EngineMetrics
from engine.processes import Channel, become_child_process
from engine.request import Request
from scheduler.scheduler import Scheduler, SchedulerConfig

WORKER_STEP_TIMEOUT_S = 600.0


class WorkerGone(RuntimeError):
    pass


class EngineCore:
    def __init__(self, config: EngineConfig, ready: WorkerReady, eos_token_id: int | None, worker) -> None:
        self.ready = ready
        self.vocab_size = ready.vocab_size
        self.max_model_len = ready.max_model_len
        blocks = BlockManager(ready.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, ready.max_model_len, eos_token_id,
                            config.num_speculative_tokens),
            blocks)
        self.worker = worker  # callable: StepPlan -> StepResult
        self.metrics = EngineMetrics()

    def validate(self, msg: AddRequest) -> str | None:
        prompt = msg.prompt_ids
        if not prompt:
            return "prompt is empty"
        if len(prompt) >= self.max_model_len:
            return f"prompt has {len(prompt)} tokens; the model's context is {self.max_model_len} tokens"
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            return f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
        problems = msg.params.problems(self.vocab_size)
        if problems:
            return "; ".join(problems)
        blocks = self.scheduler.blocks
        if blocks.blocks_for(len(prompt) + 1 + self.scheduler.config.num_speculative_tokens) > blocks.num_blocks:
            return (f"prompt has {len(prompt)} tokens but the whole cache holds "
                    f"{blocks.num_blocks * blocks.block_size}")
        if msg.req_id in self.scheduler.requests:
            return f"request id {msg.req_id!r} is already in use"
        return None

    def add(self, msg: AddRequest) -> RequestDelta | None:
        error = self.validate(msg)
        if error:
            delta = RequestDelta(msg.req_id, finished=True, finish_reason="error", error=error,
                                 num_prompt_tokens=len(msg.prompt_ids), finish_time=time.time())
            self.metrics.on_deltas([delta])
            return delta
        req = Request(msg.req_id, msg.prompt_ids, msg.params, msg.arrival_time or None)
        self.scheduler.add(req)
        self.metrics.on_arrival(msg.req_id, req.arrival_time)
        return None

    def abort(self, req_ids: list[str]) -> list[RequestDelta]:
        out = []
        for rid in req_ids:
            req = self.scheduler.abort(rid)
            if req is not None:
                out.append(RequestDelta(rid, finished=True, finish_reason="abort",
                                        num_prompt_tokens=req.num_prompt_tokens, finish_time=req.finish_time))
        self.metrics.on_deltas(out)
        return out

    def step(self) -> list[RequestDelta]:
        start = time.perf_counter()
        step = self.scheduler.schedule()
        if step.scheduled or step.plan.finished_ids:
            result = self.worker(step.plan)
        else:
            result = StepResult(step.plan.step_id)
        deltas = self.scheduler.update(step, result)
        self.metrics.on_step(time.perf_counter() - start, len(step.scheduled))
        self.metrics.on_deltas(deltas)
        return deltas

    def stats(self) -> EngineStats:
        c, s = self.scheduler.counters, self.scheduler
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting), num_preemptions=c.num_preemptions,
            num_steps=c.num_steps, prompt_tokens=c.prompt_tokens, computed_prompt_tokens=c.computed_prompt_tokens,
            generation_tokens=c.generation_tokens, prefix_cache_queries=c.prefix_cache_queries,
            prefix_cache_hits=c.prefix_cache_hits, num_free_blocks=s.blocks.num_free, num_blocks=s.blocks.num_blocks,
            metrics=self.metrics.snapshot(), spec_num_drafts=c.spec_num_drafts, spec_draft_tokens=c.spec_draft_tokens,
            spec_accepted_tokens=c.spec_accepted_tokens, spec_accepted_per_pos=list(c.spec_accepted_per_pos))


def remote_worker(plans: Channel, results: Channel):
    """A worker behind a socket pair, as the callable EngineCore drives: StepPlan -> StepResult."""
    def execute(plan):
        plans.send(plan)
        deadline = time.monotonic() + WORKER_STEP_TIMEOUT_S
        while time.monotonic() < deadline:
            msg = results.recv(timeout_ms=1000)
            if isinstance(msg, StepResult):
                return msg
            if isinstance(msg, WorkerFailed):
                raise WorkerGone(f"worker {msg.rank} failed:\n{msg.error}")
        raise WorkerGone(f"worker did not answer step {plan.step_id} within {WORKER_STEP_TIMEOUT_S:.0f} s")

    return execute


def run_engine_core(config: EngineConfig, addrs: dict[str, str], eos_token_id: int | None,
                    startup_timeout_s: float) -> None:
    become_child_process()
    ctx = zmq.Context()
    inbox = Channel(ctx, zmq.PULL, addrs["input"], bind=True, decode_type=FrontendToScheduler)
    outbox = Channel(ctx, zmq.PUSH, addrs["output"], bind=False, decode_type=None)
    plans = Channel(ctx, zmq.PUSH, addrs["plans"], bind=True, decode_type=None)
    results = Channel(ctx, zmq.PULL, addrs["results"], bind=True, decode_type=WorkerToScheduler)
    try:
        ready = results.recv(timeout_ms=int(startup_timeout_s * 1000))
        if not isinstance(ready, WorkerReady):
            raise WorkerGone(ready.error if isinstance(ready, WorkerFailed) else "worker did not start in time")
        core = EngineCore(config, ready, eos_token_id, remote_worker(plans, results))
        outbox.send(EngineReady(ready.num_blocks, config.block_size, ready.max_model_len, ready.vocab_size,
                                ready.num_blocks * config.block_size, ready.kv_bytes_per_token))
        _serve(core, inbox, outbox)
        plans.send(Shutdown())
    except Exception:
        outbox.send(EngineDead(traceback.format_exc()))
    finally:
        for ch in (inbox, outbox, plans, results):
            ch.close()
        ctx.term()


def _serve(core: EngineCore, inbox: Channel, outbox: Channel) -> None:
    while True:
        deltas: list[RequestDelta] = []
        timeout = 0 if core.scheduler.has_work() else 100
        while (msg := inbox.recv(timeout_ms=timeout)) is not None:
            timeout = 0
            if isinstance(msg, AddRequest):
                if (d := core.add(msg)) is not None:
                    deltas.append(d)
            elif isinstance(msg, AbortRequests):
                deltas.extend(core.abort(msg.req_ids))
            elif isinstance(msg, GetStats):
                outbox.send(core.stats())
            elif isinstance(msg, Shutdown):
                return
        if core.scheduler.has_work():
            deltas.extend(core.step())
        if deltas:
            outbox.send(RequestOutputs(deltas))
