"""Continuous batching over the paged cache. Pure Python: buildable and testable without torch.

One rule drives progress: each request's `num_computed` catches up with its `num_tokens` under
the step's token budget. A decode is the case where one token is missing; a prefill chunk is the
case where many are; a prefix-cache hit starts `num_computed` above zero; preemption resets it.

Each step: running requests first, each taking what it is missing up to the remaining budget;
when blocks run out the last running request is preempted. Then waiting requests are admitted,
their prompts chunked to the budget. The scheduling policy orders both queues (vLLM's): "fcfs"
runs and admits in arrival order, so the most recently admitted is preempted first; "priority"
orders by (priority, arrival): the lowest priority (highest value) is preempted first, and a
request of higher priority waits for room rather than preempt others to make it.

Accounting happens when a step is planned, not when its result returns: the scheduled tokens
count as computed at once, and a request whose step samples holds a pending token until the
result is folded in. So the next step can be planned while the worker still runs this one
(asynchronous scheduling, EngineCore): a decode then schedules its pending token, which the
worker already knows. A request whose pending tokens will reach its max_tokens is not scheduled
again; one that stops on EOS runs one step more, whose result is dropped. Cached prefix blocks
are hashed only when their tokens are known.

Parallel sampling (n completions of one prompt) shares the prompt's blocks: scheduler/completion_groups.py.

Speculative decoding: `num_computed` only ever counts verified tokens (scheduler/results.py).

Lower tiers of the prefix cache (cache/tiers.py): a prefix lookup goes on past the pool's hit
into host memory and disk. Host hits load into fresh blocks with the admitting step. A request
with blocks on disk leaves the queue while the worker reads them into host memory (the batch goes
on) and comes back to its front when the reads are in; a read that fails is a miss. The cached
blocks an allocation evicts are copied down (planned at once, so a later lookup in the same
step finds them below). That half: scheduler/tier_admission.py.
"""

from __future__ import annotations

import bisect
import itertools
import time

from cache.block_manager import ROOT_HASH, BlockManager
from cache.tiers import PrefixTiers
from engine.grammar_cache import PeerGrammars
from engine.messages import WORKER_GRAMMARS, NewRequestPlan, StepPlan
from engine.request import Request, Status
from scheduler.completion_groups import CompletionGroups
from scheduler.results import SchedulerResults
from scheduler.spec_policy import SpecPolicy
from scheduler.step import ScheduledStep, SchedulerConfig, SchedulerCounters
from scheduler.stop_rules import tokens_left
from scheduler.tier_admission import TierAdmission
from scheduler.waiting_queue import waiting_queue


def _priority_order(req: Request) -> tuple[int, int]:
    return req.priority, req.arrival_order


class Scheduler(SchedulerResults, TierAdmission):
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, tiers: PrefixTiers | None = None,
                 spec: SpecPolicy | None = None):
        self.config = config
        self.blocks = blocks
        self.tiers = tiers
        self._loading: list[Request] = []  # waiting for disk reads, out of the queue
        self._step_pins: list[bytes] = []  # host entries this step loads: kept until its spill is planned
        self.waiting = waiting_queue(config.policy)
        self.running: list[Request] = []  # in the policy's order: the last is preempted first
        self._by_priority = config.policy == "priority"
        self._arrivals = itertools.count()
        self.requests: dict[str, Request] = {}
        k = config.num_speculative_tokens
        self.counters = SchedulerCounters(spec_outcomes=[[0] * (k + 1) for _ in range(k + 1)] if k else [],
                                          spec_draft_lengths=[0] * (k + 1))
        # The draft lengths (EngineCore shares one policy between ranks and plans it each step).
        self.spec = spec if spec is not None or not k else SpecPolicy(k, adaptive=False)
        # Slots past the scheduled tokens that the worker's chained drafting writes (MTP layer).
        self._lookahead = config.num_speculative_tokens
        self._dropped: list[str] = []  # ids the worker must forget at the next step
        self._unreported: list[Request] = []  # finished inside schedule(), reported by update()
        self.groups = CompletionGroups(blocks, self._lookahead)
        self._step_id = 0
        self._worker_grammars = PeerGrammars(WORKER_GRAMMARS)  # the worker's cache, mirrored

    # ---- intake ---------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        self.add_group([req])

    def add_group(self, group: list[Request]) -> None:
        """Queues completions of one prompt: the first computes it, the rest wait for its blocks
        (when there are full blocks to share)."""
        for req in group:
            if req.req_id in self.requests:
                raise ValueError(f"request id {req.req_id!r} is already in use")
        leader, followers = group[0], group[1:]
        for req in group:
            self.requests[req.req_id] = req
            req.arrival_order = next(self._arrivals)
        self.waiting.append(leader)
        if not (followers and self.groups.hold(leader, followers)):
            self.waiting.extend(followers)

    @property
    def num_waiting(self) -> int:
        """Queued requests, those held for a shared prompt or waiting for disk reads included."""
        return len(self.waiting) + self.groups.num_held + len(self._loading)

    def abort(self, req_id: str) -> Request | None:
        """Ends a request at once, wherever it is (a client abort, or a stop string the frontend saw)."""
        req = self.requests.get(req_id)
        if req is None:
            return None
        self._finish(req, "abort")
        return req

    @property
    def num_reading(self) -> int:
        """Requests out of the queue while their blocks are read from disk."""
        return len(self._loading)

    @property
    def pending_drops(self) -> list[str]:
        """Ids the worker still holds and will be told to forget at the next step."""
        return self._dropped

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._loading)

    # ---- scheduling -----------------------------------------------------------------------

    def schedule(self) -> ScheduledStep:
        self._step_id += 1
        step = ScheduledStep(StepPlan(step_id=self._step_id))
        if self.spec is not None:
            step.plan.num_drafts = self.spec.step_drafts
        budget = self.config.max_num_batched_tokens
        if self.tiers is not None:
            self._spill(step)  # (blocks released since the last step, with a disk tier)
        budget = self._schedule_running(step, budget)
        if not self._read_first(step, budget):
            self._admit_waiting(step, budget)
        if self.tiers is not None:
            self.tiers.end_step(step.plan)
            self.tiers.unpin(self._step_pins)
            self._step_pins = []
            step.plan.await_reads = bool(self._loading) and not step.scheduled
        step.plan.finished_ids = self._dropped
        self._dropped = []
        self.counters.num_steps += 1
        if self.spec is not None:
            lengths = self.counters.spec_draft_lengths
            lengths[step.plan.num_drafts] += step.num_sampling - len(step.plan.draft_caps)
            for d in step.plan.draft_caps.values():
                lengths[d] += 1
        return step

    def _schedule_running(self, step: ScheduledStep, budget: int) -> int:
        # Runs once per running request every step: a request with blocks to spare skips _grow.
        bs = self.blocks.block_size
        lookahead = self._lookahead
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            missing = len(req.token_ids) + req.num_pending - req.num_computed
            if req.num_pending and self._done_when_pending_arrive(req):
                i += 1
                continue
            n = missing + req.num_proposed
            if n > budget:
                n = budget
            # (the worker may be ahead by the accepted drafts of a step in flight)
            if req.num_computed + req.num_unverified + n + lookahead > len(req.block_table) * bs:  # uncommon
                if self._end_if_unservable(req, n):
                    continue
                if not self._grow(req, n, step):
                    break  # req itself was preempted: nothing after it is running any more
            known = n
            if n > missing:
                step.drafts[req.req_id] = n - missing
                req.num_unverified += n - missing
                known = missing
            self._add_to_plan(step, req, n)
            self._account(req, known, step)
            budget -= n
            i += 1
        return budget

    def _done_when_pending_arrive(self, req: Request) -> bool:
        """Whether the tokens already on their way end the request by length: surely, or with
        speculation most likely, where the drafts the step in flight verifies would end it if
        accepted and the measured acceptance says they will be. (Planned again, its rows would
        most likely be dropped; left out, it waits one step where a draft was rejected. A batch
        that ends together by length otherwise ran a whole step more.)"""
        left = tokens_left(req.params.max_tokens, req.num_prompt_tokens, len(req.token_ids) + req.num_pending,
                           self.config.max_model_len)
        if left <= 0:
            return True
        return req.num_unverified >= left and self.spec is not None and self.spec.likely_accepted(left)

    def _account(self, req: Request, known: int, step: ScheduledStep) -> None:
        """The step's known tokens (not its drafts) count as computed from now; a step that
        reaches the end of what is known samples, and its token is pending until the result.
        A sampling step also proposes the drafts the next one verifies."""
        computed = req.num_computed
        if computed < req.num_prompt_tokens:
            self.counters.computed_prompt_tokens += min(known, req.num_prompt_tokens - computed)
        computed += known
        req.num_computed = computed
        if computed >= len(req.token_ids) + req.num_pending:
            req.num_pending += 1
            step.num_sampling += 1
            spec = self.spec
            if spec is not None:
                if spec.theta > 0.0 and (d := spec.drafts_for(req)) < step.plan.num_drafts:
                    step.plan.draft_caps[req.req_id] = d  # (counted in schedule(), as the others are)
                    req.num_proposed = d
                else:
                    req.num_proposed = step.plan.num_drafts
        else:
            req.num_proposed = 0

    def _end_if_unservable(self, req: Request, n: int) -> bool:
        """A request whose next step needs more blocks than the whole pool (a long generation)
        ends with "length" rather than preempting itself, or blocking the queue, forever."""
        reach = req.num_computed + req.num_unverified + n + self._lookahead
        if self.blocks.blocks_for(reach) <= self.blocks.num_blocks:
            return False
        self._finish(req, "length")
        self._unreported.append(req)
        return True

    def _grow(self, req: Request, n: int, step: ScheduledStep) -> bool:
        """Makes req's table hold num_computed + n tokens, preempting from the back if needed."""
        need = self.blocks.blocks_for(req.num_computed + req.num_unverified + n + self._lookahead) \
            - len(req.block_table)
        if need > self.blocks.num_free and self.groups.pinning:
            self.groups.unpin_tails()
        while need > self.blocks.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        new = self.blocks.allocate(need)
        if self.tiers is not None:
            self._spill(step)
        req.block_table.extend(new)
        req.new_blocks.extend(new)
        return True

    def _admit_waiting(self, step: ScheduledStep, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending:
                break  # preempted while its last step ran: back once that step's token is in
            if not req.block_table and not req.tier_loads and not self._place_cached(req, step):
                self.waiting.popleft()  # its blocks are read from disk meanwhile
                self._loading.append(req)
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            if self._end_if_unservable(req, n):
                continue
            need = self.blocks.blocks_for(req.num_computed + n + self._lookahead) - len(req.block_table)
            if need > self.blocks.num_free and self.groups.pinning:
                self.groups.unpin_tails()
                # Without its tail (if it had one) req computes from its hit: look again.
                if req.tier_loads:
                    self._release(req)  # (its hit is placed again from scratch)
                req.num_computed = min(req.num_computed, len(req.block_table) * self.blocks.block_size)
                continue
            if need > self.blocks.num_free:
                self._release(req)  # waiting requests hold no blocks, prefix hits included
                break
            new = self.blocks.allocate(need)
            if self.tiers is not None:
                self._spill(step)
            if req.tier_loads:
                new = self._load_from_tiers(req, new, step)
            req.block_table.extend(new)
            self.waiting.popleft()
            req.status = Status.RUNNING
            if req.tail_source is not None:
                step.plan.copy_src.append(req.tail_source)
                step.plan.copy_dst.append(req.block_table[-1])
                self.groups.drop_tail_source(req)  # (copies run before the step: the block may be reused in it)
            if not req.scheduled_time:
                req.scheduled_time = time.time()
                self._count_prompt(req)
            self._run(req)
            self._add_to_plan(step, req, n)
            self._account(req, n, step)
            budget -= n

    def _run(self, req: Request) -> None:
        if self._by_priority:
            bisect.insort(self.running, req, key=_priority_order)
        else:
            self.running.append(req)

    def _place_cached(self, req: Request, step: ScheduledStep) -> bool:
        """Gives an admitted request its prefix-cache hit and, if it has one, its leader's tail.
        False when part of its hit must first be read from disk."""
        if not self._apply_prefix_hit(req, step):
            return False
        if req.tail_source is not None:
            if len(req.block_table) + len(req.tier_loads) == (req.num_prompt_tokens - 1) // self.blocks.block_size:
                req.num_computed = req.num_prompt_tokens - 1  # the rest comes with the copied tail
            else:  # some of the shared blocks were evicted: compute from the hit
                self.groups.drop_tail_source(req)
        return True

    def _apply_prefix_hit(self, req: Request, step: ScheduledStep, probe: bool = False) -> bool:
        """Places req's prefix hit; False when it must wait for disk reads (they are planned).
        `probe`: only find out (and plan the reads), taking no block."""
        if req.params.prompt_logprobs is not None:
            return True  # cached tokens would have no prompt logprobs
        hit, hashes = self.blocks.lookup_prefix(req.token_ids)
        tiers = self.tiers
        # Past the pool's unbroken hit, the chain may go on through blocks below (None) and
        # blocks the pool still has (a block's tail can outlive its middle in the pool).
        more = [] if tiers is None else tiers.lookup(req.token_ids, len(hit), hashes[-1] if hashes else ROOT_HASH,
                                                     self.blocks)
        if self._lookahead and (hit or more):
            # The MTP layer's entry at a block's last position was made with the token after the
            # block, which this request may not share: recompute that block.
            if more:
                more.pop()
            else:
                hit, hashes = hit[:-1], hashes[:-1]
        below = [(len(hit) + i, h, tokens) for i, (h, tokens, block) in enumerate(more) if block is None]
        if below:
            keys = [h for _, h, _ in below]
            present = {h for h in keys if h in tiers.host}
            tiers.pin(list(present))  # (so that no slot taken for a read below is one of them)
            if len(present) < len(keys) or not all(tiers.is_ready(h) for h in present):
                # Reads for what only the disk holds (as many as host memory has room for).
                n = tiers.stage_reads([(h, tokens) for _, h, tokens in below], step.plan)
                tiers.unpin([h for h in keys[n:] if h in present])
                tiers.pin([h for h in keys[:n] if h not in present])
                if n < len(below):  # the hit ends before the first block there was no room for
                    del more[below[n][0] - len(hit):]
                    del below[n:]
                keys = keys[:n]
                if not all(tiers.is_ready(h) for h in keys):
                    self._park(req, keys)
                    return False
            self._step_pins += keys
            if probe:
                return True
            tiers.touch(keys)
            req.tier_loads = below
        if probe:
            return True
        if tiers is not None:
            self._unpark(req)
        pooled = hit + [block for _, _, block in more if block is not None]
        self.blocks.acquire(pooled)
        req.block_table = pooled
        req.block_hashes = hashes + [h for h, _, _ in more]
        req.num_computed = (len(hit) + len(more)) * self.blocks.block_size
        return True

    def _count_prompt(self, req: Request) -> None:
        """At first admission (a request that found no room is looked up again next step)."""
        req.num_cached_tokens = req.num_computed
        c = self.counters
        c.prompt_tokens += req.num_prompt_tokens
        c.prefix_cache_queries += req.num_prompt_tokens
        c.prefix_cache_hits += req.num_computed

    def _add_to_plan(self, step: ScheduledStep, req: Request, n: int) -> None:
        if req.on_worker:
            plan = step.plan
            plan.running_ids.append(req.req_id)
            plan.running_num_scheduled.append(n)
            plan.running_new_blocks.append(req.new_blocks)
        else:
            step.plan.new.append(NewRequestPlan(
                req_id=req.req_id, prompt_ids=req.token_ids[: req.num_prompt_tokens],
                output_ids=req.output_ids, params=req.params, block_ids=list(req.block_table),
                num_computed=req.num_computed, num_scheduled=n,
                grammar=None if req.grammar is None else self._worker_grammars.outgoing(req.grammar)))
            req.on_worker = True
        req.new_blocks = []
        step.scheduled.append((req, n))

    def _preempt(self, req: Request) -> None:
        if req.followers:
            self.groups.release(req, self.waiting)
        self.running.remove(req)
        self._release(req)
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.counters.num_preemptions += 1
        self.waiting.appendleft(req)

    def _release(self, req: Request) -> None:
        self.blocks.release(req.block_table)
        req.block_table = []
        req.tier_loads = []
        req.num_drafts_held = 0
        req.num_proposed = 0  # (num_unverified stays: a step in flight still folds its drafts in)
        req.block_hashes = []
        req.new_blocks = []
        req.num_computed = 0
        if req.on_worker:
            self._dropped.append(req.req_id)
            req.on_worker = False

    def _finish(self, req: Request, reason: str) -> None:
        if req.followers:
            self.groups.release(req, self.waiting)
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.leader is not None:  # held for its leader's prompt: in no queue
            self.groups.leave(req)
        elif req.tier_wait:  # waiting for disk reads: in no queue
            self._loading.remove(req)
            self._unpark(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        self.groups.drop_tail_source(req)
        self._release(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = time.time()
        del self.requests[req.req_id]

    def check_integrity(self) -> None:
        waiting = [*self.waiting, *self._loading]
        tables = [r.block_table for r in self.running] + [r.block_table for r in waiting]
        tables += [[r.tail_source] for r in waiting if r.tail_source is not None]
        self.blocks.check_integrity(tables)
        assert len(self.running) <= self.config.max_num_seqs
        assert all(r.status is Status.RUNNING for r in self.running)
        if self._by_priority:
            assert self.running == sorted(self.running, key=_priority_order), "running out of priority order"
        assert all(not r.block_table for r in self.waiting), "a waiting request holds blocks"
        assert all(not r.block_table and r.tier_wait for r in self._loading), "a request reading from disk is wrong"
        if self.tiers is not None:
            self.tiers.check_integrity()
        self.groups.check_integrity(self.running, waiting)
