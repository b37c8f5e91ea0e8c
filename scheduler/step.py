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
    # [d][a]: verifications of d drafts of which the first a were accepted (one count a
    # verification: the totals below derive from it).
    spec_outcomes: list[list[int]] = field(default_factory=list)
    spec_draft_lengths: list[int] = field(default_factory=list)  # [k + 1]: sampling steps proposing d drafts

    @property
    def spec_num_drafts(self) -> int:
        """Verifications that had at least one draft."""
        return sum(sum(row) for row in self.spec_outcomes[1:])

    @property
    def spec_draft_tokens(self) -> int:
        return sum(d * sum(row) for d, row in enumerate(self.spec_outcomes))

    @property
    def spec_accepted_tokens(self) -> int:
        return sum(a * n for row in self.spec_outcomes for a, n in enumerate(row))

    @property
    def spec_accepted_per_pos(self) -> list[int]:
        """[k]: drafts accepted at position j."""
        k = len(self.spec_outcomes) - 1
        return [sum(n for row in self.spec_outcomes for a, n in enumerate(row) if a > j) for j in range(k)]


@dataclass
class ScheduledStep:
    plan: StepPlan
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    drafts: dict[str, int] = field(default_factory=dict)  # req id -> drafts verified this step (at most)
    num_sampling: int = 0  # requests whose step samples

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)
