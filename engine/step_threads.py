"""How many torch threads a CPU worker's step runs on, chosen per step size from measured steps.

A CPU worker shares its host with the scheduler and the frontend (and, with expert parallelism,
its sibling workers). A small step is a few hundred short parallel regions: with every core in
them, a region waits for whichever of its threads the other processes just took the core from,
and the threads' spin-waiting takes those processes' time in turn, so the next plan comes later.
A large step's regions are long enough to pay for every core. Where the line falls depends on the
model, the host and what else runs, so it is measured (vLLM's CPU backend instead keeps one core
for the scheduler always; on 2 cores, one thread for every step cut the `small` model's
throughput to 0.6-0.7x):

- steps are grouped by their token count (buckets of about sqrt(2));
- each bucket runs each candidate count (1, half the worker's share, its share) until it has
  MIN_SAMPLES steps of it, then the one of the least time per token (the lower quartile of its
  latest steps: a descheduled thread only ever adds), and every other one again once every
  RETRY_EVERY steps of the bucket, so that a bad early sample does not rule a count out for good.

The compiled kernels' results do not depend on the thread count (their work items are fixed by
the shapes; decode attention splits its context for the worker's share, not the step's count:
kernels/cpu/decode.py), so the choice changes a step's time, never its tokens.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from scheduler.spec_policy import lower_quartile, token_bucket

MIN_SAMPLES = 3
RETRY_EVERY = 64
SAMPLES = 8


class StepThreads:
    def __init__(self, share: int):
        self.share = share
        self.candidates = sorted({1, max(1, share // 2), share})
        self._times: dict[tuple[int, int], deque] = {}  # (bucket, threads) -> latest seconds per token
        self._steps: dict[int, int] = {}  # bucket -> steps run in it
        self._tried: dict[tuple[int, int], int] = {}  # (bucket, threads) -> the bucket's step it last ran
        self._step: tuple[int, int, int] | None = None  # (bucket, threads, tokens) of the step running

    def choose(self, tokens: int, measured: bool = True) -> int:
        """The threads a step of `tokens` runs on (torch's count is set to it); not `measured`:
        the share, and the step's time is not recorded."""
        if measured and tokens > 0:
            b = token_bucket(tokens)
            n = self._steps[b] = self._steps.get(b, 0) + 1
            threads = self._pick(b, n)
            self._tried[(b, threads)] = n
            self._step = (b, threads, tokens)
        else:
            threads, self._step = self.share, None
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

    def record(self, seconds: float) -> None:
        """The step's time (from its forward to its result sent)."""
        if self._step is None or not (math.isfinite(seconds) and seconds > 0):
            return
        b, threads, tokens = self._step
        self._step = None
        times = self._times.get((b, threads))
        if times is None:
            times = self._times[(b, threads)] = deque(maxlen=SAMPLES)
        times.append(seconds / tokens)

    def _pick(self, b: int, n: int) -> int:
        for t in self.candidates:
            if len(self._times.get((b, t), ())) < MIN_SAMPLES:
                return t
        best = min(self.candidates, key=lambda t: lower_quartile(self._times[(b, t)]))
        for t in self.candidates:
            if t != best and n - self._tried.get((b, t), 0) >= RETRY_EVERY:
                return t
        return best

    def chosen(self) -> dict[int, int]:
        """Per bucket measured enough (its least token count), the count it runs now: for logs and tests."""
        out = {}
        for b in sorted(self._steps):
            if all(len(self._times.get((b, t), ())) >= MIN_SAMPLES for t in self.candidates):
                out[math.ceil(2 ** ((b - 0.5) / 2))] = min(
                    self.candidates, key=lambda t: lower_quartile(self._times[(b, t)]))
        return out
