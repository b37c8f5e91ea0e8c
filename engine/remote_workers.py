"""The scheduler's side of the worker processes: a plan per rank out, a result per rank back, and
the watchdog that tells a long step from a dead or hung rank.
"""

from __future__ import annotations

import time

from engine.messages import StepPlan, StepResult, WorkerFailed
from engine.processes import Channel

WORKER_STEP_TIMEOUT_S = 600.0


class WorkerGone(RuntimeError):
    pass



class RemoteWorkers:
    """Workers behind sockets, as EngineCore drives them: a plan per rank in, a result per rank
    out; `send` and `collect` apart let a step be in flight while the next one is planned.

    The watchdog lives here: every message from a rank (its heartbeats above all) marks it alive,
    and a rank silent for heartbeat_timeout_s while its result is awaited, or while idle, is
    reported as stuck. A long step is no hang: its heartbeats keep coming."""

    def __init__(self, plans: list[Channel], results: Channel, heartbeat_timeout_s: float = 5.0):
        self.plans = plans
        self.results = results
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.last_seen = [time.monotonic()] * len(plans)
        # A rank can answer the next step before another rank answers this one.
        self._early: dict[tuple[int, int], StepResult] = {}

    def _note(self, msg) -> None:
        """Heartbeats and failures, whatever the moment they arrive."""
        if isinstance(msg, WorkerFailed):
            raise WorkerGone(f"worker {msg.rank} failed:\n{msg.error}")
        if msg is not None:
            self.last_seen[msg.rank] = time.monotonic()

    def _check_alive(self, ranks) -> None:
        now = time.monotonic()
        silent = [r for r in ranks if now - self.last_seen[r] > self.heartbeat_timeout_s]
        if silent:
            r = silent[0]
            raise WorkerGone(f"worker rank {r} is stuck: no heartbeat for {now - self.last_seen[r]:.1f} s "
                             f"(the limit is {self.heartbeat_timeout_s:g} s); the process is stopped or hung")

    def _read(self, timeout_ms: int) -> list[StepResult]:
        """Everything the ranks sent by now (waiting up to timeout_ms for the first), every
        message noted as a sign of life before any rank is judged silent."""
        results = []
        msg = self.results.recv(timeout_ms=timeout_ms)
        while msg is not None:
            self._note(msg)
            if isinstance(msg, StepResult):
                results.append(msg)
            msg = self.results.recv(timeout_ms=0)
        return results

    def poll_idle(self) -> None:
        """Between steps: read what the ranks sent (heartbeats, a failure) and check they live."""
        self._read(timeout_ms=0)  # (no step result is awaited between steps)
        self._check_alive(range(len(self.plans)))

    def __call__(self, step_plans: list[StepPlan]) -> list[StepResult]:
        self.send(step_plans)
        return self.collect(step_plans)

    def send(self, step_plans: list[StepPlan]) -> None:
        for ch, plan in zip(self.plans, step_plans):
            ch.send(plan)

    def collect(self, step_plans: list[StepPlan]) -> list[StepResult]:
        """The results of step_plans (results of earlier steps are not waiting: each is
        collected before the next is)."""
        plans = self.plans
        got: dict[int, StepResult] = {}
        for rank, plan in enumerate(step_plans):
            if (early := self._early.pop((rank, plan.step_id), None)) is not None:
                got[rank] = early
        deadline = time.monotonic() + WORKER_STEP_TIMEOUT_S
        while len(got) < len(plans):
            missing = sorted(set(range(len(plans))) - set(got))
            if time.monotonic() > deadline:
                raise WorkerGone(f"workers {missing} did not answer step {step_plans[0].step_id} "
                                 f"within {WORKER_STEP_TIMEOUT_S:.0f} s")
            for msg in self._read(timeout_ms=250):
                if msg.step_id == step_plans[msg.rank].step_id:
                    got[msg.rank] = msg
                elif msg.step_id > step_plans[msg.rank].step_id:
                    self._early[(msg.rank, msg.step_id)] = msg
            self._check_alive(sorted(set(range(len(plans))) - set(got)))
        return [got[r] for r in range(len(plans))]
