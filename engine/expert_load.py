"""Per-layer expert load in the scheduler process: the routed-token counts every rank reports every
LOAD_REPORT_STEPS steps (engine/model_runner.py), summed over ranks, over a sliding window of the
last `window_reports` reports; and what it means for expert parallelism: each rank's load (the
choices routed to the experts it holds) and the imbalance, per MoE layer the most loaded rank's
load over the mean rank's, averaged over the layers (1.0: even; the step waits for the most
loaded rank at every MoE layer, so 1.5 means a third of the MoE time is spent waiting).

numpy, not Python loops: DeepSeek-V3 reports 58 layers x 256 experts per rank.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

# Steps between two reports of the per-layer load (engine/model_runner.py sends them); with EPLB
# at most its interval and window, so that a short interval re-places from fresh counts.
LOAD_REPORT_STEPS = 16
WINDOW_REPORTS = 8  # without EPLB: the imbalance gauge's window, 128 steps


def report_steps(config) -> int:
    if not config.enable_eplb:
        return LOAD_REPORT_STEPS
    return min(LOAD_REPORT_STEPS, config.eplb_interval_steps, config.eplb_window_steps)


def window_reports(config) -> int:
    """Reports the window keeps: eplb_window_steps' worth with EPLB."""
    if not config.enable_eplb:
        return WINDOW_REPORTS
    return max(1, math.ceil(config.eplb_window_steps / report_steps(config)))


class ExpertLoadWindow:
    def __init__(self, num_ranks: int, window_reports: int = WINDOW_REPORTS):
        self.num_ranks = num_ranks
        self._reports: deque[np.ndarray] = deque(maxlen=window_reports)
        self._sum: np.ndarray | None = None

    def add(self, blobs: list[bytes], num_experts: int) -> None:
        """One report round: each rank's counts since the last one (all ranks report together)."""
        counts = None
        for blob in blobs:
            c = np.frombuffer(blob, dtype="<i4").reshape(-1, num_experts).astype(np.int64)
            counts = c if counts is None else counts + c
        if counts is None:
            return
        if self._sum is None or self._sum.shape != counts.shape:
            self._reports.clear()
            self._sum = np.zeros_like(counts)
        if len(self._reports) == self._reports.maxlen:
            self._sum -= self._reports[0]
        self._reports.append(counts)
        self._sum += counts

    @property
    def counts(self) -> np.ndarray | None:
        """[MoE layers, experts] choices routed in the window, every rank's tokens."""
        return self._sum

    def rank_loads(self) -> np.ndarray | None:
        """[MoE layers, ranks]: each rank holds an equal, contiguous range of the experts."""
        if self._sum is None:
            return None
        layers, experts = self._sum.shape
        return self._sum.reshape(layers, self.num_ranks, experts // self.num_ranks).sum(axis=2)

    def imbalance(self) -> float:
        """Mean over the MoE layers that routed anything of max rank load / mean rank load."""
        loads = self.rank_loads()
        if loads is None:
            return 0.0
        busy = loads.sum(axis=1) > 0
        if not busy.any():
            return 0.0
        loads = loads[busy]
        return float((loads.max(axis=1) / loads.mean(axis=1)).mean())
