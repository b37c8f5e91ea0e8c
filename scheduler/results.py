"""The scheduler's half that folds a step's results back in (a mixin of Scheduler, as SGLang's
scheduler keeps its output processing apart): sampled and accepted tokens appended, stop rules
applied, verified drafts counted, filled blocks hashed into the prefix cache, a delta per request.

Speculative decoding: the worker returns up to k draft tokens with each sampled token; the next
decode of that request computes its missing token plus those drafts (verification) and keeps
the accepted ones. `num_computed` only ever counts verified tokens, so a rejected draft leaves
nothing behind: its cache slots lie beyond `num_computed` and are overwritten, no block holding
one is hashed into the prefix cache, and tables keep k slots of lookahead for the next drafts.
"""

from __future__ import annotations

import itertools
import time

from engine.messages import RequestDelta, StepResult
from engine.request import Request, Status
from scheduler.spec_policy import record_verification
from scheduler.step import ScheduledStep
from scheduler.stop_rules import append_until_stop


class SchedulerResults:
    """Scheduler's update(); it reads the scheduler's config, counters, groups and queues and ends
    requests through its _finish."""

    def update(self, step: ScheduledStep, result: StepResult) -> list[RequestDelta]:
        """Folds a step's sampled tokens back in; returns a delta per request that produced
        tokens or finished."""
        # Runs once per scheduled request every step: locals, and one call per request.
        drafts, counters, running, spec = step.drafts, self.counters, Status.RUNNING, self.spec is not None
        if self.tiers is not None and (result.reads_done or result.reads_failed or result.writes_failed
                                       or result.tier_copy_seconds):
            self.on_tier_result(result)
        # Results are matched to the requests this step scheduled, not looked up by id: with a
        # step in flight, a finished request's id may already belong to a new request.
        in_step = self._scheduled_requests(step)
        deltas = [self._fill_delta(RequestDelta(r.req_id), r) for r in self._unreported]
        self._unreported = []
        if result.failed:
            deltas += self._fail(result.failed)
        now = time.time()
        drafts_out = result.draft_ids or itertools.repeat([])
        with_logprobs = bool(result.logprobs or result.prompt_logprobs)
        eos, max_len, finished = self.config.eos_token_id, self.config.max_model_len, Status.FINISHED
        for req_id, token_ids, new_drafts in zip(result.req_ids, result.token_ids, drafts_out):
            req = in_step.get(req_id)
            if req is None or req.status is finished:
                continue  # aborted, or ended while a step already sent ran
            planned = drafts.get(req_id, 0) if drafts else 0
            if planned:
                req.num_unverified -= planned
            if token_ids:
                # (A request preempted while its step ran is waiting now: its tokens count all
                # the same, and it is readmitted once they are in.)
                req.num_pending -= 1
            elif req.status is not running:
                continue
            first = not req.first_token_time and bool(token_ids)
            if first:
                req.first_token_time = now
            accepted, reason = append_until_stop(req.token_ids, token_ids, req.num_prompt_tokens, req.params,
                                                 eos, max_len)
            if spec and req.status is running:
                self._fold_drafts(req, planned, token_ids, new_drafts)
            if reason:
                self._finish(req, reason)
            counters.generation_tokens += len(accepted)
            delta = RequestDelta(req_id, accepted)
            if with_logprobs:
                delta.logprobs = result.logprobs.get(req_id, [])[: len(accepted)]
                delta.prompt_logprobs = result.prompt_logprobs.get(req_id, [])
            deltas.append(self._fill_delta(delta, req) if first or reason else delta)
        return deltas

    def _fail(self, failed: dict[str, str]) -> list[RequestDelta]:
        """Ends the requests the worker gave up on (before their tokens of the step are read:
        the worker no longer constrained them)."""
        deltas = []
        for req_id, error in failed.items():
            req = self.requests.get(req_id)
            if req is not None:
                self._finish(req, "error")
                req.error = error
                deltas.append(self._fill_delta(RequestDelta(req_id), req))
        return deltas

    def _scheduled_requests(self, step: ScheduledStep) -> dict[str, Request]:
        """The step's requests by id, their filled blocks cached and their followers released
        once the prompt they share is."""
        in_step: dict[str, Request] = {}
        for req, _ in step.scheduled:
            in_step[req.req_id] = req
            if req.status is Status.RUNNING:
                self._cache_filled_blocks(req)
                if req.followers and self.groups.prompt_shareable(req):
                    self.groups.release(req, self.waiting)
        return in_step

    def _cache_filled_blocks(self, req: Request) -> None:
        known = min(req.num_computed, len(req.token_ids))  # (tokens still pending are not hashable)
        if known // self.blocks.block_size > len(req.block_hashes):  # a block just filled up
            self.blocks.cache_full_blocks(req.token_ids, req.block_table, req.block_hashes, known)

    def _fold_drafts(self, req: Request, planned: int, token_ids: list[int], new_drafts: list[int]) -> None:
        """A running request's verification (of at most `planned` drafts) and its new drafts."""
        if planned:
            # The worker verified what it held, which the plan bounded: the drafts the step
            # before this one proposed.
            verified = req.num_drafts_held
            if planned < verified:
                verified = planned
            if verified:
                accepted = len(token_ids) - 1
                if accepted > verified:
                    accepted = verified
                # The accepted drafts' cache entries are verified ones (those past a stop token are moot).
                computed, n = req.num_computed + accepted, len(req.token_ids)
                req.num_computed = computed = computed if computed < n else n
                if computed // self.blocks.block_size > len(req.block_hashes):  # a block just filled up
                    self.blocks.cache_full_blocks(req.token_ids, req.block_table, req.block_hashes, computed)
                self.counters.spec_outcomes[verified][accepted] += 1
                record_verification(req, verified, accepted)
        req.num_drafts_held = len(new_drafts)
        if not req.num_pending and token_ids:  # no later sampling step is in flight
            req.num_proposed = len(new_drafts)

    def _fill_delta(self, delta: RequestDelta, req: Request) -> RequestDelta:
        delta.num_prompt_tokens = req.num_prompt_tokens
        delta.num_cached_tokens = req.num_cached_tokens
        delta.first_token_time = req.first_token_time
        delta.scheduled_time = req.scheduled_time
        if req.status is Status.FINISHED:
            delta.finished = True
            delta.finish_reason = req.finish_reason
            delta.finish_time = req.finish_time
            delta.error = req.error
        return delta
