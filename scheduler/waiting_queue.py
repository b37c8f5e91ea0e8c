"""The waiting queue, in the order the scheduling policy admits requests (vLLM's policies).

"fcfs": arrival order; a request that goes back (preempted, or a completion released by its
first sibling) goes to the front. "priority": lowest `priority` value first, then arrival order,
so a request that goes back takes its old place among the others of its priority.
"""

from __future__ import annotations

import heapq
from collections import deque

from engine.request import Request

POLICIES = ("fcfs", "priority")


class FcfsQueue(deque):
    """append / appendleft / popleft / [0] / remove, as a deque has them."""


class PriorityQueue:
    """The same operations over a heap keyed by (priority, arrival order)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Request]] = []

    def append(self, req: Request) -> None:
        heapq.heappush(self._heap, (req.priority, req.arrival_order, req))

    appendleft = append  # the key, not the side, decides its place

    def extend(self, reqs) -> None:
        for req in reqs:
            self.append(req)

    def popleft(self) -> Request:
        return heapq.heappop(self._heap)[2]

    def __getitem__(self, i: int) -> Request:
        if i != 0:
            raise IndexError("a priority queue shows only its head")
        return self._heap[0][2]

    def remove(self, req: Request) -> None:  # (an abort: linear, as it is for a deque)
        self._heap = [e for e in self._heap if e[2] is not req]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self):
        return (e[2] for e in self._heap)


def waiting_queue(policy: str) -> FcfsQueue | PriorityQueue:
    if policy not in POLICIES:
        raise ValueError(f"scheduling_policy must be one of {POLICIES}, got {policy!r}")
    return PriorityQueue() if policy == "priority" else FcfsQueue()
