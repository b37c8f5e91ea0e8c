"""What a worker knows of each request, rebuilt from step plans alone (new requests in full,
running ones as deltas). Shared by the model worker and the no-op worker used in tests and
the scheduler benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.messages import StepPlan
from engine.sampling_params import SamplingParams


@dataclass
class WorkerRequest:
    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_table: list[int]
    num_computed: int
    draft_ids: list[int] = field(default_factory=list)  # proposed last step, verified at the next
    grammar: object = None  # the model worker's matcher (model/grammar_mask.py) for structured outputs

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


class ScheduledWork:
    """One request's share of a step. Its counts are fixed when the plan is applied (they are
    read many times per step, before `advance` moves the request on)."""

    __slots__ = ("req", "num_tokens", "num_known", "num_drafts", "samples", "propose")

    def __init__(self, req: WorkerRequest, num_tokens: int, propose: int = 0):
        self.req = req
        unknown = len(req.token_ids) - req.num_computed
        self.num_known = num_tokens if num_tokens < unknown else unknown
        # The plan's count of drafts is a bound: planned while the step before was in flight
        # (asynchronous scheduling), it could not know how many that step would propose.
        drafts = num_tokens - self.num_known
        self.num_drafts = drafts if drafts <= len(req.draft_ids) else len(req.draft_ids)
        self.num_tokens = self.num_known + self.num_drafts  # known tokens to compute, then drafts to verify
        # Whether this chunk reaches the end of the known tokens, so a next token is due.
        self.samples = num_tokens >= unknown
        self.propose = propose  # drafts to propose after this step (StepPlan.num_drafts, capped)

    @property
    def tokens(self) -> list[int]:
        start = self.req.num_computed
        return self.req.token_ids[start : start + self.num_known] + self.req.draft_ids[: self.num_drafts]


class WorkerState:
    def __init__(self) -> None:
        self.requests: dict[str, WorkerRequest] = {}

    def apply(self, plan: StepPlan) -> list[ScheduledWork]:
        for req_id in plan.finished_ids:
            self.requests.pop(req_id, None)
        work = []
        propose, caps = plan.num_drafts, plan.draft_caps
        for n in plan.new:
            req = WorkerRequest(n.req_id, n.prompt_ids + n.output_ids, len(n.prompt_ids), n.params,
                                list(n.block_ids), n.num_computed)
            self.requests[n.req_id] = req
            work.append(ScheduledWork(req, n.num_scheduled, caps.get(n.req_id, propose) if caps else propose))
        requests = self.requests
        for req_id, n, blocks in zip(plan.running_ids, plan.running_num_scheduled, plan.running_new_blocks):
            req = requests[req_id]
            if blocks:
                req.block_table.extend(blocks)
            work.append(ScheduledWork(req, n, caps.get(req_id, propose) if caps else propose))
        return work

    @staticmethod
    def advance(work: list[ScheduledWork], sampled: dict[str, list[int]],
                drafts: dict[str, list[int]] | None = None) -> None:
        """sampled: the tokens each request emitted (accepted drafts, then one sampled token);
        drafts: what each proposes for the next step."""
        for w in work:
            req = w.req
            emitted = sampled.get(req.req_id)
            if emitted:
                req.num_computed += w.num_known + (len(emitted) - 1 if w.num_drafts else 0)
                req.token_ids.extend(emitted)
            else:
                req.num_computed += w.num_known
            if req.draft_ids or drafts:
                req.draft_ids = drafts.get(req.req_id, []) if drafts else []
