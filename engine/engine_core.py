"""The scheduler process: owns every request, plans each step, folds results back in.

EngineCore.step() is schedule -> execute on the worker -> update; with asynchronous scheduling
the next step is planned and sent before the one in flight is folded in, so the scheduler's work
overlaps the worker's. run_engine_core() is the thin ZMQ loop around it. No torch here.
"""

from __future__ import annotations

import logging
import time
import traceback

import numpy as np
import zmq

from cache.block_manager import BlockManager
from cache.tiers import PrefixTiers
from engine.config import EngineConfig
from engine.eplb import ExpertBalancer, write_load_file
from engine.expert_load import ExpertLoadWindow, window_reports
from engine.grammar_cache import GrammarBlobs
from engine.messages import (
    HEARTBEAT_INTERVAL_S,
    SCHEDULER_GRAMMARS,
    AbortRequests,
    AddRequest,
    EngineDead,
    EngineHeartbeat,
    EngineReady,
    EngineStats,
    FrontendToScheduler,
    GetStats,
    RequestDelta,
    RequestOutputs,
    Shutdown,
    StepResult,
    TierStats,
    WorkerFailed,
    WorkerHeartbeat,
    WorkerReady,
    WorkerToScheduler,
    completion_ids,
)
from engine.metrics import EngineMetrics
from engine.model_config import ModelConfig
from engine.processes import Channel, Heartbeat, become_child_process
from engine.remote_workers import RemoteWorkers, WorkerGone
from engine.request import Request
from engine.request_input import prompt_problem
from engine.sampling_params import completion_params
from scheduler.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from scheduler.spec_policy import SpecPolicy

log = logging.getLogger("mlaserve.engine")

# A rank that holds a prompt's prefix takes it while it has at most this share more requests (plus
# one) than the least loaded rank.
PREFIX_PLACEMENT_SLACK = 0.25


class EngineCore:
    """One scheduler (block pool, running batch) per expert-parallel rank: attention is
    data-parallel, so a request lives on one rank from arrival to finish. A step schedules every
    rank and, when any has work, runs all of them (ranks without tokens serve the others'
    expert choices). With one rank this is plain continuous batching."""

    def __init__(self, config: EngineConfig, readies: list[WorkerReady], eos_token_id: int | None, worker) -> None:
        readies = sorted(readies, key=lambda r: r.rank)
        self.ready = readies[0]
        k = config.num_speculative_tokens
        self.spec = SpecPolicy(k, adaptive=config.speculative_draft_policy == "adaptive") if k else None
        self._outcomes_seen = [[0] * (k + 1) for _ in range(k + 1)]  # spec_outcomes at the last step
        self._last_result_time: float | None = None
        self.vocab_size = self.ready.vocab_size
        self.max_model_len = self.ready.max_model_len
        self.schedulers = [
            Scheduler(SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, r.max_model_len,
                                      eos_token_id, config.num_speculative_tokens, config.scheduling_policy),
                      BlockManager(r.num_blocks, config.block_size, config.enable_prefix_caching,
                                   record_evictions=bool(r.host_blocks), record_releases=bool(r.disk_blocks)),
                      PrefixTiers(r.host_blocks, r.disk_blocks, config.block_size, r.disk_keys)
                      if r.host_blocks else None, self.spec)
            for r in readies]
        # callable: [StepPlan per rank] -> [StepResult per rank]; one with send/collect (workers
        # behind sockets) can have a step in flight while the next is planned.
        self.worker = worker
        self.pipelined = config.async_scheduling and hasattr(worker, "send")
        self._in_flight: list[ScheduledStep] | None = None
        self.metrics = EngineMetrics()
        self.rank_of: dict[str, int] = {}
        self.rank_requests = [0] * len(self.schedulers)
        self.routed_tokens: list[int] = []
        self.expert_load = ExpertLoadWindow(len(self.schedulers), window_reports(config))
        self.balancer = ExpertBalancer(config, ModelConfig.from_checkpoint(config.model_dir)) if config.enable_eplb \
            else None
        # With EPLB, the loads of the physical slots (whose ranks are fixed), for the ranks' loads.
        self.slot_load = ExpertLoadWindow(len(self.schedulers), window_reports(config)) if self.balancer else None
        self.rank_routed_tokens = [0] * len(self.schedulers)
        self.eplb_max_seconds = self.eplb_last_seconds = 0.0  # a switch's time on its slowest rank
        self.eplb_load_file = config.eplb_load_file
        self.idle_rank_steps = 0
        self.grammar_blobs = GrammarBlobs(SCHEDULER_GRAMMARS)  # the frontend mirrors it (grammar_cache.py)
        self.block_bytes = self.ready.kv_bytes_per_token * config.block_size

    @property
    def scheduler(self) -> Scheduler:
        """Rank 0's scheduler (the only one without expert parallelism)."""
        return self.schedulers[0]

    def has_work(self) -> bool:
        return self._in_flight is not None or any(s.has_work() for s in self.schedulers)

    def validate(self, msg: AddRequest) -> str | None:
        prompt = msg.prompt_ids
        if not prompt:
            return "prompt is empty"
        problems = msg.params.problems(self.vocab_size)  # (first: a bad truncate_prompt_tokens explains a long prompt)
        if problems:
            return "; ".join(problems)
        if (problem := prompt_problem(prompt, self.max_model_len, self.vocab_size)) is not None:
            return problem
        if (msg.params.structured_outputs is None) != (msg.grammar is None):
            return ("structured_outputs came without its compiled grammar (AddRequest.grammar; mlaserve's "
                    "frontends compile it)" if msg.grammar is None else
                    "a compiled grammar came without structured_outputs in the parameters")
        if msg.priority and self.schedulers[0].config.policy != "priority":
            return (f"priority is {msg.priority}, but the engine schedules first come first served: "
                    f"start it with scheduling_policy 'priority' (--scheduling-policy priority)")
        blocks = min((s.blocks for s in self.schedulers), key=lambda b: b.num_blocks)
        if blocks.blocks_for(len(prompt) + 1 + self.scheduler.config.num_speculative_tokens) > blocks.num_blocks:
            return (f"prompt has {len(prompt)} tokens but the whole cache holds "
                    f"{blocks.num_blocks * blocks.block_size}")
        taken = [i for i in completion_ids(msg.req_id, msg.params.n) if i in self.rank_of]
        if taken:
            return f"request id {taken[0]!r} is already in use"
        return None

    def _place(self, prompt_ids: list[int]) -> int:
        """The least loaded rank (fewest requests, then most free blocks). With lower tiers of the
        prefix cache, the rank holding the longest prefix of the prompt (each rank has its own
        tiers) unless it has more than PREFIX_PLACEMENT_SLACK more requests than the least loaded
        one: a returning conversation finds its history where it left it, and load still spreads."""
        def load(rank: int):
            s = self.schedulers[rank]
            return len(s.running) + s.num_waiting, -s.blocks.num_free
        ranks = range(len(self.schedulers))
        least = min(ranks, key=load)
        if len(ranks) == 1 or self.schedulers[0].tiers is None:
            return least
        chain = self.schedulers[0].blocks.chain(prompt_ids)
        held = [s.tiers.held_blocks(chain, s.blocks) for s in self.schedulers]
        limit = load(least)[0] * (1 + PREFIX_PLACEMENT_SLACK) + 1

        def preference(rank: int):
            requests, less_free = load(rank)
            return held[rank], -requests, -less_free
        return max((r for r in ranks if load(r)[0] <= limit), key=preference)

    def add(self, msg: AddRequest) -> list[RequestDelta]:
        """Queues the request's completions (one unless params.n > 1), or answers each of their
        ids with the error that refused it."""
        n = msg.params.n
        ids = completion_ids(msg.req_id, n)
        error = None
        if msg.grammar is not None:  # (first, refused or not: the frontend mirrors this cache)
            msg.grammar = self.grammar_blobs.incoming(msg.grammar)
            if msg.grammar is None:
                error = "structured_outputs: the grammar came without its blob and is not cached here"
        error = error or self.validate(msg)
        if error:
            now = time.time()
            deltas = [RequestDelta(i, finished=True, finish_reason="error", error=error,
                                   num_prompt_tokens=len(msg.prompt_ids), finish_time=now) for i in ids]
            self.metrics.on_deltas(deltas)
            return deltas
        arrival = msg.arrival_time or None
        group = [Request(i, msg.prompt_ids, msg.params if n == 1 else completion_params(msg.params, k), arrival,
                         msg.priority) for k, i in enumerate(ids)]
        for req in group:
            req.grammar = msg.grammar
        # A group stays on one rank: its completions share the prompt's blocks there.
        rank = self._place(msg.prompt_ids)
        self.schedulers[rank].add_group(group)
        self.rank_requests[rank] += 1
        for req in group:
            self.rank_of[req.req_id] = rank
            self.metrics.on_arrival(req.req_id, req.arrival_time)
        return []

    def abort(self, req_ids: list[str]) -> list[RequestDelta]:
        out = []
        for rid in req_ids:
            rank = self.rank_of.pop(rid, None)
            req = self.schedulers[rank].abort(rid) if rank is not None else None
            if req is not None:
                out.append(RequestDelta(rid, finished=True, finish_reason="abort",
                                        num_prompt_tokens=req.num_prompt_tokens, finish_time=req.finish_time))
        self.metrics.on_deltas(out)
        return out

    def step(self) -> list[RequestDelta]:
        start = time.perf_counter()
        if not self.pipelined:
            steps = self._schedule()
            results = self.worker([st.plan for st in steps]) if self._has_plan(steps) else _no_results(steps)
            return self._fold(steps, results, start)
        if self._in_flight is None:
            steps = self._schedule()
            if not self._has_plan(steps):
                return self._fold(steps, _no_results(steps), start)
            self.worker.send([st.plan for st in steps])
            self._in_flight = steps
        steps = self._in_flight
        if any(s.num_reading for s in self.schedulers):
            # Requests waiting for disk reads come back with this step's result: planning the
            # next step after it lets them into that step rather than the one after.
            self._in_flight = None
            return self._fold(steps, self.worker.collect([st.plan for st in steps]), start)
        # The next step goes out before this one's result is read: the worker starts it as soon
        # as it is done with this one, while the results are folded in here.
        upcoming = self._schedule()
        self._in_flight = None
        if self._has_plan(upcoming):
            self.worker.send([st.plan for st in upcoming])
            self._in_flight = upcoming
        results = self.worker.collect([st.plan for st in steps])
        deltas = self._fold(steps, results, start)
        if self._in_flight is None:  # nothing to send: what the planning ended (if anything) is reported now
            deltas.extend(self._fold(upcoming, _no_results(upcoming), None))
        return deltas

    def _schedule(self) -> list[ScheduledStep]:
        if self.spec is not None:
            self.spec.plan(max(min(s.config.max_num_seqs, len(s.running) + s.num_waiting) for s in self.schedulers))
        steps = [s.schedule() for s in self.schedulers]
        if len(steps) > 1 and any(st.scheduled for st in steps):
            for st in steps:  # a rank waiting for disk reads must not hold up the others' step
                st.plan.await_reads = False
        if self.balancer is not None and self._has_plan(steps):  # (a plan that has any is sent)
            placement = self.balancer.on_step(self.expert_load.counts)
            if placement is not None:
                for st in steps:
                    st.plan.expert_placement = placement
        return steps

    @staticmethod
    def _has_plan(steps: list[ScheduledStep]) -> bool:
        return any(st.scheduled or st.plan.finished_ids or st.plan.await_reads or st.plan.delete_keys
                   for st in steps)

    def _fold(self, steps: list[ScheduledStep], results: list[StepResult], start: float | None) -> list[RequestDelta]:
        if len(steps) > 1 and self._has_plan(steps):
            self.idle_rank_steps += sum(not st.scheduled for st in steps)
        deltas: list[RequestDelta] = []
        for s, st, result in zip(self.schedulers, steps, results):
            deltas.extend(s.update(st, result))
            self._count_routed(result.routed_tokens)
        if self.spec is not None and results:
            self._measure_spec(steps, results)
            self._count_outcomes()
        if results and results[0].layer_load:  # (every rank reports in the same steps)
            self.expert_load.add([r.layer_load for r in results], len(results[0].routed_tokens))
            if results[0].slot_load:
                self._add_slot_load([r.slot_load for r in results])
        if results and (switched := max(r.eplb_seconds for r in results)):
            self.eplb_last_seconds, self.eplb_max_seconds = switched, max(self.eplb_max_seconds, switched)
        for s in self.schedulers:  # (every rank's, every step)
            if s.tiers is not None and s.tiers.counters.load_waits:
                self.metrics.on_tier_loads(s.tiers.counters.load_waits)
                s.tiers.counters.load_waits.clear()
        for d in deltas:
            if d.finished:
                self.rank_of.pop(d.req_id, None)
        if start is not None:
            self.metrics.on_step(time.perf_counter() - start, sum(len(st.scheduled) for st in steps))
        self.metrics.on_deltas(deltas)
        return deltas

    def idle(self) -> None:
        """Nothing to run: the next step's period is not one of back-to-back steps."""
        self._last_result_time = None

    def _measure_spec(self, steps: list[ScheduledStep], results: list[StepResult]) -> None:
        """The step's cost as the slowest rank saw it, for the draft-length policy, and the time
        since the last result (back to back: the step's period, its overhead included)."""
        now = time.perf_counter()
        period = now - self._last_result_time if self._last_result_time is not None else 0.0
        self._last_result_time = now
        i = max(range(len(results)), key=lambda r: results[r].forward_seconds + sum(results[r].draft_seconds))
        st, r = steps[i], results[i]
        if st.scheduled and r.forward_seconds > 0:
            self.spec.on_step(st.num_tokens, st.num_sampling, sum(st.drafts.values()), r.forward_seconds,
                              r.draft_rows, r.draft_seconds, period, st.plan.num_drafts)

    def _count_outcomes(self) -> None:
        """The verifications folded in since the last step, for the policy's acceptance."""
        seen = self._outcomes_seen
        delta = []
        for d, row in enumerate(seen):
            now = [sum(s.counters.spec_outcomes[d][a] for s in self.schedulers) for a in range(len(row))]
            delta.append([n - m for n, m in zip(now, row)])
            seen[d] = now
        self.spec.on_outcomes(delta)

    def _count_routed(self, counts: list[int]) -> None:
        if not counts:
            return
        if not self.routed_tokens:
            self.routed_tokens = [0] * len(counts)
        for e, n in enumerate(counts):
            if n:
                self.routed_tokens[e] += n

    def stats(self) -> EngineStats:
        ss = self.schedulers
        cs = [s.counters for s in ss]

        def total(name: str) -> int:
            return sum(getattr(c, name) for c in cs)

        per_pos = [sum(col) for col in zip(*(c.spec_accepted_per_pos for c in cs))]
        return EngineStats(
            num_running=sum(len(s.running) for s in ss), num_waiting=sum(s.num_waiting for s in ss),
            num_preemptions=total("num_preemptions"), num_steps=self.scheduler.counters.num_steps,
            prompt_tokens=total("prompt_tokens"), computed_prompt_tokens=total("computed_prompt_tokens"),
            generation_tokens=total("generation_tokens"), prefix_cache_queries=total("prefix_cache_queries"),
            prefix_cache_hits=total("prefix_cache_hits"), num_free_blocks=sum(s.blocks.num_free for s in ss),
            num_blocks=sum(s.blocks.num_blocks for s in ss), metrics=self.metrics.snapshot(),
            spec_num_drafts=total("spec_num_drafts"), spec_draft_tokens=total("spec_draft_tokens"),
            spec_accepted_tokens=total("spec_accepted_tokens"), spec_accepted_per_pos=per_pos,
            spec_draft_lengths=[sum(col) for col in zip(*(c.spec_draft_lengths for c in cs))],
            spec_step_draft_length=self.spec.step_drafts if self.spec is not None else 0,
            routed_tokens=list(self.routed_tokens), num_ranks=len(ss), rank_running=[len(s.running) for s in ss],
            rank_requests=list(self.rank_requests),
            idle_rank_steps=self.idle_rank_steps, kv_tiers=self._tier_stats(),
            moe_imbalance=self._rank_window().imbalance(), moe_window_rank_load=self._window_rank_load(),
            **self._eplb_stats())

    def _eplb_stats(self) -> dict:
        b = self.balancer
        if b is None:
            return {}
        return dict(rank_routed_tokens=list(self.rank_routed_tokens), eplb_rebalances=b.rebalances,
                    eplb_moved_slots=b.moved_slots, eplb_max_seconds=self.eplb_max_seconds,
                    eplb_last_seconds=self.eplb_last_seconds)

    def _add_slot_load(self, blobs: list[bytes]) -> None:
        slots, ranks = self.balancer.num_slots, len(self.schedulers)
        self.slot_load.add(blobs, slots)
        for blob in blobs:
            per_rank = np.frombuffer(blob, dtype="<i4").reshape(-1, ranks, slots // ranks).sum(axis=(0, 2))
            for r, n in enumerate(per_rank):
                self.rank_routed_tokens[r] += int(n)

    def _rank_window(self) -> ExpertLoadWindow:
        """Where the ranks' real loads are: the slots' counts with EPLB, else the experts' (their ranges)."""
        return self.slot_load if self.slot_load is not None else self.expert_load

    def _window_rank_load(self) -> list[int]:
        loads = self._rank_window().rank_loads()
        return [] if loads is None else [int(x) for x in loads.sum(axis=0)]

    def save_expert_load(self) -> None:
        """At shutdown, with eplb_load_file: the window's counts, for the next start's placement."""
        counts = self.expert_load.counts
        if self.balancer is None or not self.eplb_load_file or counts is None or not counts.any():
            return
        write_load_file(self.eplb_load_file, dict(zip(self.balancer.layers, counts)), self.balancer.num_experts)

    def _tier_stats(self) -> TierStats | None:
        tiers = [s.tiers for s in self.schedulers if s.tiers is not None]
        if not tiers:
            return None
        cs = [t.counters for t in tiers]
        bb = self.block_bytes
        return TierStats(
            host_hit_tokens=sum(c.host_hit_tokens for c in cs), disk_hit_tokens=sum(c.disk_hit_tokens for c in cs),
            bytes_pool_to_host=bb * sum(c.blocks_down for c in cs),
            bytes_host_to_pool=bb * sum(c.blocks_up for c in cs),
            bytes_host_to_disk=bb * sum(c.blocks_written for c in cs),
            bytes_disk_to_host=bb * sum(c.blocks_read for c in cs), reads_failed=sum(c.reads_failed for c in cs),
            copy_seconds=sum(c.copy_seconds for c in cs), host_blocks=sum(t.host_blocks for t in tiers),
            host_blocks_used=sum(len(t.host) for t in tiers), disk_blocks=sum(t.disk_blocks for t in tiers),
            disk_blocks_used=sum(len(t.disk) for t in tiers))


def _no_results(steps: list[ScheduledStep]) -> list[StepResult]:
    """For steps that sent the worker nothing."""
    return [StepResult(st.plan.step_id) for st in steps]


def run_engine_core(config: EngineConfig, addrs: dict[str, str], eos_token_id: int | None,
                    startup_timeout_s: float) -> None:
    become_child_process()
    ctx = zmq.Context()
    inbox = Channel(ctx, zmq.PULL, addrs["input"], bind=True, decode_type=FrontendToScheduler)
    outbox = Channel(ctx, zmq.PUSH, addrs["output"], bind=False, decode_type=None)
    plans = [Channel(ctx, zmq.PUSH, addrs[f"plans{r}"], bind=True, decode_type=None) for r in range(config.ep_size)]
    results = Channel(ctx, zmq.PULL, addrs["results"], bind=True, decode_type=WorkerToScheduler)
    heartbeat = None
    try:
        readies: dict[int, WorkerReady] = {}
        deadline = time.monotonic() + startup_timeout_s
        while len(readies) < config.ep_size:
            msg = results.recv(timeout_ms=max(1, int((deadline - time.monotonic()) * 1000)))
            if isinstance(msg, WorkerReady):
                readies[msg.rank] = msg
            elif not isinstance(msg, WorkerHeartbeat):  # (a rank that is ready already beats)
                raise WorkerGone(msg.error if isinstance(msg, WorkerFailed) else "workers did not start in time")
        core = EngineCore(config, list(readies.values()), eos_token_id,
                          RemoteWorkers(plans, results, config.worker_heartbeat_timeout_s))
        tokens = sum(r.num_blocks for r in readies.values()) * config.block_size
        ready = core.ready
        outbox.send(EngineReady(sum(r.num_blocks for r in readies.values()), config.block_size, ready.max_model_len,
                                ready.vocab_size, tokens, ready.kv_bytes_per_token,
                                max(r.step_peak_bytes for r in readies.values())))
        heartbeat = Heartbeat(ctx, addrs["output"], EngineHeartbeat(), HEARTBEAT_INTERVAL_S)
        _serve(core, inbox, outbox)
        for ch in plans:
            ch.send(Shutdown())
        try:
            core.save_expert_load()
        except OSError as e:
            log.warning("could not write the expert load to eplb_load_file %r: %s", config.eplb_load_file, e)
    except Exception:
        outbox.send(EngineDead(traceback.format_exc()))
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        for ch in (inbox, outbox, results, *plans):
            ch.close()
        ctx.term()


def _add_or_refuse(core: EngineCore, msg: AddRequest) -> list[RequestDelta]:
    """A request that the checks let through but that fails to queue fails alone: the engine's
    state is untouched until add() has placed the whole group."""
    try:
        return core.add(msg)
    except Exception as e:
        error = f"the engine could not take the request: {type(e).__name__}: {e}"
        return [RequestDelta(i, finished=True, finish_reason="error", error=error)
                for i in completion_ids(msg.req_id, msg.params.n)]


def _serve(core: EngineCore, inbox: Channel, outbox: Channel) -> None:
    while True:
        deltas: list[RequestDelta] = []
        timeout = 0 if core.has_work() else 100
        while (msg := inbox.recv(timeout_ms=timeout)) is not None:
            timeout = 0
            if isinstance(msg, AddRequest):
                deltas.extend(_add_or_refuse(core, msg))
            elif isinstance(msg, AbortRequests):
                deltas.extend(core.abort(msg.req_ids))
            elif isinstance(msg, GetStats):
                outbox.send(core.stats())
            elif isinstance(msg, Shutdown):
                return
        if core.has_work():
            deltas.extend(core.step())
        else:
            core.idle()
            core.worker.poll_idle()
        if deltas:
            outbox.send(RequestOutputs(deltas))
