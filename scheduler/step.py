"""What the scheduler is configured with, counts, and plans: its config, its counters, and one
planned step (the StepPlan sent to the workers with the requests it scheduled).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.messages import StepPlan
from engine.request import Request


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    eos_token_id: int | None
    num_speculative_tokens: int = 0
    policy: str = "fcfs"  # or "priority" (scheduler/waiting_queue.py)


@dataclass
class SchedulerCounters:
    num_steps: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    spec_num_drafts: int = 0  # verifications that had at least one draft
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)  # [k]: accepted at draft position j
    spec_draft_lengths: list[int] = field(default_factory=list)  # [k + 1]: sampling steps proposing d drafts


@dataclass
class ScheduledStep:
    plan: StepPlan
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    drafts: dict[str, int] = field(default_factory=dict)  # req id -> drafts verified this step (at most)
    num_sampling: int = 0  # requests whose step samples

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)
