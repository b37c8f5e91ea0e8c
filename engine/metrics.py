"""The engine's serving numbers, kept in the scheduler process (which sees every request's
arrival, every step and every token) and shipped as a snapshot inside EngineStats. No
prometheus here: the server turns snapshots into metric families when it is scraped.

Per-token work is O(requests that produced tokens this step), like the scheduler's update.
"""

from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from engine.messages import RequestDelta

# Bucket bounds follow vLLM's for the same quantities, so dashboards port unchanged.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]
STEP_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
LENGTH_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
TIER_LOAD_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]


class HistogramSnapshot(msgspec.Struct):
    bounds: list[float]
    counts: list[int]  # per bucket (not cumulative); one more than bounds: the +Inf bucket
    total: float = 0.0


class MetricsSnapshot(msgspec.Struct):
    histograms: dict[str, HistogramSnapshot] = {}
    finished: dict[str, int] = {}  # finish reason -> requests


class Histogram:
    def __init__(self, bounds: list[float]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, list(self.counts), self.total)


class _Live:
    __slots__ = ("arrival", "last_token", "num_output")

    def __init__(self, arrival: float):
        self.arrival = arrival
        self.last_token = 0.0
        self.num_output = 0


class EngineMetrics:
    def __init__(self) -> None:
        self.hist = {
            "time_to_first_token_seconds": Histogram(TTFT_BUCKETS),
            "inter_token_latency_seconds": Histogram(ITL_BUCKETS),
            "time_per_output_token_seconds": Histogram(ITL_BUCKETS),
            "e2e_request_latency_seconds": Histogram(LATENCY_BUCKETS),
            "request_queue_time_seconds": Histogram(LATENCY_BUCKETS),
            "request_prompt_tokens": Histogram(LENGTH_BUCKETS),
            "request_generation_tokens": Histogram(LENGTH_BUCKETS),
            "step_duration_seconds": Histogram(STEP_BUCKETS),
            "batch_size": Histogram(BATCH_BUCKETS),
            # How long a request waited for its prefix's blocks to be read back from disk.
            "kv_tier_load_seconds": Histogram(TIER_LOAD_BUCKETS),
        }
        self.finished: dict[str, int] = {}
        self._live: dict[str, _Live] = {}

    def on_arrival(self, req_id: str, arrival_time: float) -> None:
        self._live[req_id] = _Live(arrival_time or time.time())

    def on_step(self, duration_s: float, batch_size: int) -> None:
        self.hist["step_duration_seconds"].observe(duration_s)
        if batch_size:
            self.hist["batch_size"].observe(batch_size)

    def on_tier_loads(self, waits: list[float]) -> None:
        h = self.hist["kv_tier_load_seconds"]
        for w in waits:
            h.observe(w)

    def on_deltas(self, deltas: list[RequestDelta]) -> None:
        now = time.time()
        h = self.hist
        itl = h["inter_token_latency_seconds"]
        for d in deltas:
            live = self._live.get(d.req_id)
            if d.new_token_ids and live is not None:
                if live.num_output == 0:
                    h["time_to_first_token_seconds"].observe((d.first_token_time or now) - live.arrival)
                else:
                    itl.observe(now - live.last_token)
                live.last_token = now
                live.num_output += len(d.new_token_ids)
            if d.finished:
                self._on_finish(d, live, now)

    def _on_finish(self, d: RequestDelta, live: _Live | None, now: float) -> None:
        reason = d.finish_reason or "unknown"
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self._live.pop(d.req_id, None)
        if live is None or reason == "error":
            return
        h = self.hist
        finish = d.finish_time or now
        h["e2e_request_latency_seconds"].observe(finish - live.arrival)
        if d.scheduled_time:
            h["request_queue_time_seconds"].observe(d.scheduled_time - live.arrival)
        h["request_prompt_tokens"].observe(d.num_prompt_tokens)
        h["request_generation_tokens"].observe(live.num_output)
        if live.num_output > 1 and d.first_token_time:
            h["time_per_output_token_seconds"].observe((live.last_token - d.first_token_time) / (live.num_output - 1))

    def snapshot(self) -> MetricsSnapshot:
        return MetricsSnapshot({k: v.snapshot() for k, v in self.hist.items()}, dict(self.finished))
