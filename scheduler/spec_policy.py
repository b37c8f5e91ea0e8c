"""How many MTP drafts each request proposes, chosen per step from measured cost and acceptance.

Speculation trades compute for steps: verifying d drafts costs d more rows in the main model
and d MTP passes, and saves the steps its accepted drafts replace. At low load a step's time
hardly grows with its rows (weights are read once for the whole batch), so every draft pays;
when the batch is compute-bound, a verified row costs about what it would cost as a row of its
own, and the MTP passes come on top, so drafts lose. The policy (adaptive; "fixed" proposes
num_speculative_tokens every step) estimates, before each step:

    tokens(D) = B * E(D),      E(D) = 1 + sum_{j<=D} prod_{i<=j} alpha_i
    time(D)   = O + T(n) + [D > 0] * (M1(n) + (D - 1) * M(B)),      n = B(1 + D)

for a decode step of draft length D = 0..k at the last step's batch size B, with alpha_i the
measured acceptance of draft position i, T(n) the measured time of a main forward over n
tokens, M1(n) that of the MTP layer's first pass over a step of n rows (it writes all their
entries in its cache, and runs the rest of the layer over one row a drafting request) and M(n)
that of a chained pass over n rows, each piecewise linear between buckets of the counts
seen (prefill steps included) and made non-decreasing; where decode steps of this batch size
and draft length have been measured enough, their own period replaces O + T + M. O is the rest of a
step's period (the time between two results back to back, less the worker's compute):
scheduling, messages, sampling's bookkeeping, what the frontend takes from a shared host. Every
step pays it once, so fewer steps for the same tokens save it: at low load it can be most of
what drafts save.

The choice is made for decoding, and steps with prompt tokens take it too: while drafting pays
at this load, new prompts' MTP entries are made as they are prefilled (their drafts later read
them), and when it does not the MTP layer is skipped altogether, prompts included. (Positions it
skipped stay out of its cache: a request drafting again later reads those entries as they are,
which lowers its acceptance, never its output. An earlier rule skipped the MTP layer in steps
that were mostly prompt: where that skipped every prompt of a burst of arrivals, the demo
model's first-draft acceptance fell from 1.00 to 0.88 for the whole of those requests, more than
the pass saves; on DeepSeek-V3 that layer is one of 62.)

It takes the D of most tokens per second (switching only for a gain of more than SWITCH_GAIN).
A request then drafts fewer than D where its own acceptance p (per position, decayed) makes
the j-th draft worth less than its marginal cost: j drafts while p**j >= theta,
theta = (time(D) - time(D - 1)) / B * tokens(D) / time(D), the tokens the step's rate would make
in the time one more draft a request takes. So a request whose drafts keep failing drafts less,
and at low load (theta near 0) all draft D; a request drafting at TYPICAL_SHARE of the typical
acceptance or better always drafts D (theta is capped there), so that the length chosen is the
length run. A draft length not run for a while is run again
for a few steps where its estimate is anywhere near the best (EXPLORE_EVERY): a bad sample
must not keep one out for good.

Pure Python and O(1) per request: it runs inside the scheduler's per-request loop.
"""

from __future__ import annotations

import math
from collections import deque

# Relative throughput gain needed to change the step's draft length (no flapping on noise).
SWITCH_GAIN = 0.03
# Decay of a draft position's acceptance statistics per step that tried it: they follow the
# traffic within ~50 such steps. Steps that did not try a position leave its estimate as last
# measured (decaying it every step drew an untried position back to the prior, so a draft
# length not run for a while looked better than it was measured).
DECAY = 0.98
# A cost bucket's estimate is the lower quartile of its latest steps: step times on a shared
# host have outliers many times the typical step (a descheduled thread, a first allocation),
# and their noise only ever adds.
COST_SAMPLES = 15
# A draft length not run at about this batch for EXPLORE_EVERY steps (or measured there fewer
# than CELL_TRUSTED times) is run again for EXPLORE_STEPS (its proposal, then verifications)
# when its estimate is within EXPLORE_WITHIN of the best: an estimate from a bad sample is
# corrected, at a cost of about 1% of the throughput where two lengths are close. A cell's
# own times replace the cost curves' estimate once it has CELL_MIN.
EXPLORE_EVERY = 128
EXPLORE_STEPS = 3
EXPLORE_WITHIN = 0.9
# ... and one never run at this batch size, once, within NEVER_RUN_WITHIN: its estimate is the
# cost curves' guess, never checked (it kept batch 1 from drafting at all in 3 benchmark runs of
# 12, at 0.75-0.9 of no drafts); run at any estimate, batch 256's D = 2 (0.52) was explored at
# every batch size a cold batch drained through.
NEVER_RUN_WITHIN = 0.7
CELL_MIN = 3
CELL_TRUSTED = 4
REQUEST_DECAY = 0.8  # per verification of that request
PRIOR_ACCEPTANCE = 0.8  # before anything is measured
PRIOR_TRIALS = 2.0  # pseudo-verifications a request's own acceptance starts from (at the global rate)
# A request drafts the step's full length while its own acceptance is at least this share of the
# typical request's (below that, as its marginal cost says).
TYPICAL_SHARE = 0.9


def token_bucket(n: float) -> int:
    """Token counts in steps of about sqrt(2)."""
    return int(round(2 * math.log2(n))) if n > 0 else -1


def _batch_bucket(n: float) -> int:
    """Batch sizes in steps of 2: a decode step's time changes little within one, and a batch
    draining through the sizes visits few."""
    return int(round(math.log2(n))) if n > 0 else -1


def lower_quartile(xs) -> float:
    s = sorted(xs)
    return s[len(s) // 4]


class StepCost:
    """T(n): a main forward's seconds over n tokens, from the lower quartile per bucket of n."""

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[deque, deque]] = {}  # bucket -> (latest n, latest seconds)
        self._curve: list[tuple[float, float]] | None = None  # (n, seconds) by n, rebuilt lazily

    def add(self, n: int, seconds: float) -> None:
        if n <= 0 or not math.isfinite(seconds) or seconds <= 0:
            return
        b = self._buckets.get(token_bucket(n))
        if b is None:
            b = self._buckets[token_bucket(n)] = (deque(maxlen=COST_SAMPLES), deque(maxlen=COST_SAMPLES))
        b[0].append(n)
        b[1].append(seconds)
        self._curve = None

    @property
    def known(self) -> bool:
        return bool(self._buckets)

    def _points(self) -> list[tuple[float, float]]:
        if self._curve is None:
            pts = sorted((lower_quartile(ns), lower_quartile(ts)) for ns, ts in self._buckets.values())
            # A step of more tokens costs no less: a bucket measured dearer than a larger one
            # (noise, or a bucket of few samples) takes the larger one's time.
            for i in range(len(pts) - 2, -1, -1):
                if pts[i][1] > pts[i + 1][1]:
                    pts[i] = (pts[i][0], pts[i + 1][1])
            self._curve = pts
        return self._curve

    def __call__(self, n: float) -> float:
        pts = self._points()
        if not pts:
            return 0.0
        # Outside what was measured, as if compute-bound: a larger step is guessed dear (so
        # drafts are not added on a guess), a smaller one cheap (so it is tried, and measured).
        if n <= pts[0][0]:
            return pts[0][1] * n / pts[0][0]
        for (n0, t0), (n1, t1) in zip(pts, pts[1:]):
            if n <= n1:
                return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
        n_max, t_max = pts[-1]
        return t_max * n / n_max


def record_verification(req, drafted: int, accepted: int) -> None:
    """A request's own acceptance, decayed: what drafts_for() caps its drafts by."""
    req.draft_hits = req.draft_hits * REQUEST_DECAY + accepted
    req.draft_trials = req.draft_trials * REQUEST_DECAY + accepted + (accepted < drafted)


class SpecPolicy:
    """Shared by every rank's scheduler (expert-parallel ranks take the same draft length)."""

    def __init__(self, max_drafts: int, adaptive: bool = True):
        self.max_drafts = max_drafts
        self.adaptive = adaptive
        self.step_drafts = max_drafts  # D for the step being planned
        self.theta = 0.0  # a request drafts j tokens while its acceptance**j >= theta
        self.cost = StepCost()  # T: the main forward
        self.first_draft_cost = StepCost()  # M1: the MTP layer's first pass, by the step's rows
        self.draft_cost = StepCost()  # M: a chained MTP pass, by its rows
        self._accepted = [0.0] * max_drafts  # decayed: position j's drafts accepted ...
        self._trials = [0.0] * max_drafts  # ... of those verified (its earlier drafts all accepted)
        self._decodes = 0.0  # requests that sampled last step
        self._other_tokens = 0.0  # the rest of its tokens (prefill chunks)
        self._steps = 0
        # (batch bucket, draft length) -> latest compute times of decode steps of that kind
        self._cells: dict[tuple[int, int], deque] = {}
        self._cell_used: dict[tuple[int, int], int] = {}  # the step each ran last
        self.overhead = 0.0  # O
        self._overheads: deque = deque(maxlen=COST_SAMPLES * 4)
        self._exploring = 0  # steps left of a draft length run again (EXPLORE_EVERY)

    # ---- what is measured -----------------------------------------------------------------

    def acceptance(self, j: int) -> float:
        """alpha_j (0-based position): draft j accepted, given the ones before it were."""
        t = self._trials[j]
        return (self._accepted[j] + PRIOR_ACCEPTANCE) / (t + 1.0)

    def likely_accepted(self, n: int) -> bool:
        """Whether a request's next n drafts are more likely accepted than not."""
        p = 1.0
        for j in range(min(n, self.max_drafts)):
            p *= self.acceptance(j)
        return p >= 0.5

    def on_outcomes(self, outcomes: list[list[int]]) -> None:
        """Verifications since the last call: outcomes[d][a] of d drafts with the first a accepted
        (SchedulerCounters.spec_outcomes' growth). Position j was tried where d > j and a >= j."""
        trials = [0] * self.max_drafts
        accepted = [0] * self.max_drafts
        for d, row in enumerate(outcomes):
            for a, n in enumerate(row):
                if n:
                    for j in range(min(d, a + 1)):
                        trials[j] += n
                        if j < a:
                            accepted[j] += n
        for j in range(self.max_drafts):
            if trials[j]:
                self._trials[j] = self._trials[j] * DECAY + trials[j]
                self._accepted[j] = self._accepted[j] * DECAY + accepted[j]

    def on_step(self, num_tokens: int, num_decodes: int, num_verified: int, forward_seconds: float,
                draft_rows: list[int], draft_seconds: list[float], period: float = 0.0,
                num_drafts: int = 0) -> None:
        """A step's measurements (the slowest rank's with expert parallelism): its tokens and
        main-forward time, each MTP pass's rows and time, the time since the last result (0:
        not back to back) and its draft length."""
        self.cost.add(num_tokens, forward_seconds)
        compute = forward_seconds + sum(draft_seconds)
        if not (math.isfinite(compute) and compute > 0):
            return  # (a worker's clock gone wrong teaches nothing)
        decode_step = num_tokens == num_decodes + num_verified
        if decode_step and num_decodes and (
                num_drafts * num_decodes * 0.9 <= num_verified <= num_drafts * num_decodes):
            # A decode step at its own draft length (drafts verified about as many as
            # proposed): what the choice at this batch size is between, measured as it is,
            # by its period where it ran back to back (its overheads grow with its drafts too).
            cell = self._cells.get((_batch_bucket(num_decodes), num_drafts))
            if cell is None:
                cell = self._cells[(_batch_bucket(num_decodes), num_drafts)] = deque(maxlen=COST_SAMPLES)
            cell.append(period if period > 0 and math.isfinite(period) else compute + self.overhead)
        for i, (rows, seconds) in enumerate(zip(draft_rows, draft_seconds)):
            if i:
                self.draft_cost.add(rows, seconds)
            elif decode_step:
                # (Only decode steps teach M1: a first pass over prompt chunks runs the layer
                # over its few drafting rows alone, far cheaper than a decode step of as many rows.)
                self.first_draft_cost.add(rows, seconds)
        if period > 0:
            overhead = period - compute
            if math.isfinite(overhead):
                self._overheads.append(max(0.0, overhead))
                self.overhead = lower_quartile(self._overheads)
        self._decodes = num_decodes
        self._other_tokens = max(0, num_tokens - num_decodes - num_verified)

    # ---- what is chosen -------------------------------------------------------------------

    def expected_tokens(self, d: int) -> float:
        """E(d): tokens a request emits per step with d drafts."""
        e, p = 1.0, 1.0
        for j in range(d):
            p *= self.acceptance(j)
            e += p
        return e

    def estimate(self, d: int, decodes: float | None = None, measured: bool = True) -> tuple[float, float]:
        """(tokens, seconds) of a decode step of draft length d at the last step's batch size.
        `measured`: from decode steps of that kind where there are enough (else from the cost
        curves)."""
        b = self._decodes if decodes is None else decodes
        e = self.expected_tokens(d)
        cell = self._cells.get((_batch_bucket(b), d)) if measured else None
        if cell is not None and len(cell) >= CELL_MIN:
            return b * e, lower_quartile(cell)
        n = b * (1 + d)
        t = self.overhead + self.cost(n)
        if d:
            # The first MTP pass writes the module's entries of all the step's rows and runs the
            # rest of its layer over one a request, as each chained pass does. Never measured
            # (drafting off since start): as dear as the main forward over a row a request (over
            # all n rows, a batch-1 step of D = 1 looked 0.75x the rate of no drafts, never close
            # enough to be explored, and so was never measured).
            first = self.first_draft_cost(n) if self.first_draft_cost.known else self.cost(b)
            chained = self.draft_cost(b) if self.draft_cost.known else self.cost(b)
            t += first + (d - 1) * chained
        return b * e, t

    def plan(self, upcoming: int = 0) -> int:
        """Sets the next step's draft length and theta from what was measured; returns it.
        `upcoming`: the requests that will be decoding once the waiting ones are in (running and
        waiting, up to what a step takes). Where that is more than the last step decoded (a burst
        of arrivals), the choice is made for that batch: its prompts' MTP entries are made only
        if drafting will pay once they decode (a batch of 256 arrivals was prefilled with the
        MTP layer chosen at the last batch's small tail, then decoded without drafts)."""
        self._steps += 1
        decodes = max(self._decodes, upcoming)
        if not self.adaptive or not self.max_drafts or self._decodes < 1 or not self.cost.known:
            self.step_drafts, self.theta = self.max_drafts, 0.0
            return self.step_drafts
        if self._exploring:
            self._exploring -= 1
            self._cell_used[(_batch_bucket(self._decodes), self.step_drafts)] = self._steps
            return self.step_drafts
        rates = []
        for d in range(self.max_drafts + 1):
            tokens, seconds = self.estimate(d, decodes)
            rates.append(tokens / seconds if seconds > 0 else 0.0)
        best = max(range(len(rates)), key=rates.__getitem__)
        if rates[best] <= rates[self.step_drafts] * (1 + SWITCH_GAIN):
            best = self.step_drafts
        b = _batch_bucket(decodes)
        explore = self._to_explore(best, rates) if decodes == self._decodes else None
        if explore is not None:
            best = explore
            self._exploring = EXPLORE_STEPS - 1
            self.theta = 0.0
        self._cell_used[(b, best)] = self._steps
        self.step_drafts = best
        if explore is not None:
            return best
        if best == 0:
            self.theta = 0.0
        else:
            # A request's last draft costs what the step's last draft length costs, shared by
            # the batch; worth it if it emits what the step's rate makes in that time.
            marginal = (self.estimate(best, decodes)[1] - self.estimate(best - 1, decodes)[1]) / decodes
            # ... but a request drafting about as well as the rest drafts D: where two lengths'
            # estimates are close, theta comes near the typical acceptance, and capping the
            # typical request would run a length the choice did not pick, whose steps measure
            # neither (seen: batch-1 steps of D = 1 whose one request drafted none, for good).
            self.theta = min(max(0.0, marginal) * rates[best], (TYPICAL_SHARE * self._typical_acceptance(best)) ** best)
        return best

    def _typical_acceptance(self, d: int) -> float:
        """What drafts_for() measures for a request whose drafts are accepted at the global
        rates, d a step: accepted over (accepted + one where one failed)."""
        accepted = self.expected_tokens(d) - 1.0
        all_accepted = 1.0
        for j in range(d):
            all_accepted *= self.acceptance(j)
        return accepted / (accepted + 1.0 - all_accepted) if accepted > 0 else 0.0

    def _to_explore(self, best: int, rates: list[float]) -> int | None:
        """A draft length to run again at this batch size, or None. A cell of few samples (the
        first ones may come from first-time costs) is judged by the cost curves, and run again
        until it has CELL_TRUSTED; one measured enough, by its samples, now and then; one never run
        at this batch size, once, on a looser bound (NEVER_RUN_WITHIN). Only
        decode steps are measured by batch size: a step with prompt tokens explores nothing."""
        b = _batch_bucket(self._decodes)
        candidates = []
        for d in range(self.max_drafts + 1):
            if d == best or self._other_tokens:
                continue
            since = self._steps - self._cell_used.get((b, d), 0)
            if len(self._cells.get((b, d), ())) < CELL_TRUSTED:
                tokens, seconds = self.estimate(d, measured=False)
                rate = tokens / seconds if seconds > 0 else 0.0
                due = since > 8 * EXPLORE_STEPS
            else:
                rate, due = rates[d], since > EXPLORE_EVERY
            within = NEVER_RUN_WITHIN if (b, d) not in self._cell_used else EXPLORE_WITHIN
            if due and rate >= within * rates[best]:
                candidates.append((rate, d))
        return max(candidates)[1] if candidates else None

    def drafts_for(self, req) -> int:
        """The drafts req proposes after this step: D, or fewer where its own acceptance is low."""
        d = self.step_drafts
        if not d or self.theta <= 0.0:
            return d
        p = (req.draft_hits + PRIOR_TRIALS * self.acceptance(0)) / (req.draft_trials + PRIOR_TRIALS)
        if p ** d >= self.theta:
            return d
        # Capped: its record fades toward the typical one while it drafts less, so a request
        # whose drafts failed early is tried again (one that drafts none verifies nothing).
        req.draft_hits *= REQUEST_DECAY
        req.draft_trials *= REQUEST_DECAY
        if p <= 0.0 or p >= 1.0:
            return 0 if p <= 0.0 else d
        return max(0, min(d, int(math.log(self.theta) / math.log(p))))
