"""The scheduler's half that deals with the prefix cache's lower tiers (a mixin of Scheduler, as
results.py is; cache/tiers.py keeps what each tier holds): what allocations evict goes down, host
hits load into the admitting step, requests with blocks only on disk wait out of the queue for
their reads and come back to its front, and an idle engine lets the requests it would admit look
below first.
"""

from __future__ import annotations

import itertools
import time

from engine.messages import StepResult
from engine.request import Request
from scheduler.step import ScheduledStep


class TierAdmission:
    """Reads the scheduler's tiers, blocks, queues and its _apply_prefix_hit."""

    def _spill(self, step: ScheduledStep) -> None:
        """What allocation evicted goes down at once, so that a lookup later in this step finds
        it in host memory (the worker copies down before it loads)."""
        if self.blocks.evicted:
            self.tiers.spill(self.blocks.evicted, step.plan)
            self.blocks.evicted.clear()

    def _read_first(self, step: ScheduledStep, budget: int) -> bool:
        """With nothing running, the requests this step would admit look for their blocks below
        first; when some must be read from disk this step admits none and only waits for the
        reads (a short while), and the next admits them all: requests that arrive together start
        together, a request that could start at once waiting a read rather than the others a
        whole prefill step. Once only: the next step admits whoever is ready (the worker waits
        for the reads up to 50 ms in this one). With a batch running nothing waits for a read."""
        if self.running or self.tiers is None or not self.waiting:
            return False
        parked, admitted = [], 0
        for req in itertools.islice(self.waiting, self.config.max_num_seqs):
            if admitted >= budget:
                break
            if req.num_pending or req.block_table or req.tier_loads:
                continue
            if self._apply_prefix_hit(req, step, probe=True):
                admitted += req.num_tokens  # (a bound: its hit is not subtracted)
            else:
                parked.append(req)
        for req in parked:
            self.waiting.remove(req)
            self._loading.append(req)
        return bool(parked)

    def _park(self, req: Request, keys: list[bytes]) -> None:
        """req waits out of the queue for the reads of `keys` (pinned: until it is back)."""
        tiers = self.tiers
        tiers.unpin(req.tier_pins)
        req.tier_pins = keys
        req.tier_wait = {h for h in keys if not tiers.is_ready(h)}
        req.tier_from_disk.update(req.tier_wait)
        if not req.tier_wait_since:
            req.tier_wait_since = time.perf_counter()

    def _unpark(self, req: Request) -> None:
        """Drops what req pinned while it waited for reads."""
        if req.tier_pins:
            self.tiers.unpin(req.tier_pins)
            req.tier_pins = []
        req.tier_wait = set()

    def _load_from_tiers(self, req: Request, new: list[int], step: ScheduledStep) -> list[int]:
        """Fresh blocks take req's host hits at their places in its table (copied in before the
        step runs); returns the new blocks left for the rest of its tokens."""
        plan, tiers, bs = step.plan, self.tiers, self.blocks.block_size
        c = tiers.counters
        table, pooled, fresh = [], iter(req.block_table), iter(new)
        loads = {pos: (h, tokens) for pos, h, tokens in req.tier_loads}
        for pos in range(len(req.block_table) + len(loads)):
            if pos not in loads:
                table.append(next(pooled))
                continue
            block = next(fresh)
            h, tokens = loads[pos]
            table.append(block)
            plan.load_slots.append(tiers.slot(h))
            plan.load_blocks.append(block)
            self.blocks.register(block, h, tokens)
            if h in req.tier_from_disk:
                c.disk_hit_tokens += bs
            else:
                c.host_hit_tokens += bs
        c.blocks_up += len(loads)
        req.block_table = table
        req.tier_loads = []
        req.tier_from_disk = set()
        if req.tier_wait_since:
            c.load_waits.append(time.perf_counter() - req.tier_wait_since)
            req.tier_wait_since = 0.0
        return list(fresh)

    def on_tier_result(self, result: StepResult) -> None:
        """Folds the worker's tier news in; requests whose reads are all in go back to the front."""
        self.tiers.on_result(result)
        if not self._loading or not (result.reads_done or result.reads_failed):
            return
        failed = set(result.reads_failed)
        back = []
        for req in self._loading:
            if failed:
                req.tier_pins = [h for h in req.tier_pins if h not in failed]
            req.tier_wait.difference_update(result.reads_done)
            req.tier_wait.difference_update(failed)
            if not req.tier_wait:
                back.append(req)
        for req in reversed(back):
            self._loading.remove(req)
            self.waiting.appendleft(req)
