"""A request as the scheduler tracks it."""

from __future__ import annotations

import enum
import time

from engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(self, req_id: str, prompt_ids: list[int], params: SamplingParams,
                 arrival_time: float | None = None, priority: int = 0):
        self.req_id = req_id
        self.params = params
        self.priority = priority  # lower runs sooner, under the "priority" scheduling policy
        self.arrival_order = 0  # the scheduler's count of arrivals: ties between equal priorities
        self.num_prompt_tokens = len(prompt_ids)
        self.token_ids = list(prompt_ids)  # prompt, then every accepted output token
        self.num_computed = 0  # tokens whose cache entries exist, or will once the steps sent have run
        self.num_pending = 0  # sampled tokens of steps sent whose results are not folded in yet
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chain of hashes of the full, verified blocks
        self.new_blocks: list[int] = []  # allocated since the worker last heard of this request
        self.num_drafts_held = 0  # drafts the worker proposed last, verified at the next decode
        # Drafts the worker will hold for the next verification: those the last planned sampling
        # step asks for (a bound while it is in flight), then those it proposed.
        self.num_proposed = 0
        self.num_unverified = 0  # drafts of steps in flight: the worker's position may be ahead by this many
        self.draft_hits = 0.0  # decayed counts of its accepted drafts and of its draft trials
        self.draft_trials = 0.0  # (scheduler/spec_policy.py)
        self.status = Status.WAITING
        self.on_worker = False  # whether the worker holds this request's state
        self.num_cached_tokens = 0  # prefix-cache hit at first admission
        self.num_preemptions = 0
        self.arrival_time = arrival_time if arrival_time is not None else time.time()
        self.scheduled_time = 0.0
        self.first_token_time = 0.0
        self.finish_time = 0.0
        self.finish_reason: str | None = None
        self.error: str | None = None  # why, when finish_reason is "error"
        # Completions of one prompt (SamplingParams.n): the first computes the prompt, the others
        # wait (held, in no queue) until its blocks are in the prefix cache, then start from them.
        self.followers: list[Request] = []
        self.leader: Request | None = None  # set while held
        # The leader's block holding the prompt's tail, referenced for this completion until its
        # admission copies it (so it computes only the last prompt token).
        self.tail_source: int | None = None
        # The prefix cache's lower tiers (cache/tiers.py): the (hash, tokens) of host hits that the
        # admitting step loads; while it waits for disk reads, the keys it pinned, those not read
        # yet, which of its hits came from disk, and since when it waits.
        self.tier_loads: list[tuple[bytes, tuple[int, ...]]] = []
        self.tier_pins: list[bytes] = []
        self.tier_wait: set[bytes] = set()
        self.tier_from_disk: set[bytes] = set()
        self.tier_wait_since = 0.0
        self.grammar = None  # the compiled constraint (messages.GrammarPlan) of params.structured_outputs

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def __repr__(self) -> str:
        return (f"Request({self.req_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed}, blocks={self.block_table})")
