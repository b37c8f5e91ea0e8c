"""Every message that crosses a process boundary: msgspec structs, msgpack on the wire.

frontend -> scheduler: AddRequest, AbortRequests, GetStats, Shutdown
scheduler -> frontend: EngineReady, RequestOutputs, EngineStats, EngineDead, EngineHeartbeat
scheduler -> worker:   StepPlan, Shutdown
worker -> scheduler:   WorkerReady, StepResult, WorkerFailed, WorkerHeartbeat
"""

from __future__ import annotations

import msgspec

from engine.metrics import MetricsSnapshot
from engine.sampling_params import MAX_PARALLEL_SAMPLES, SamplingParams


class Message(msgspec.Struct, tag=True, omit_defaults=True):
    pass


# ---- frontend <-> scheduler -------------------------------------------------------------------

class GrammarPlan(msgspec.Struct, omit_defaults=True):
    """A request's compiled grammar (params.structured_outputs), from the frontend that compiled
    it to the worker that matches it: `key` the constraint's (StructuredOutputsParams.key), `blob`
    xgrammar's serialized CompiledGrammar, "" where the receiver holds the key already
    (engine/grammar_cache.py: the scheduler keeps SCHEDULER_GRAMMARS, a worker WORKER_GRAMMARS)."""
    key: str
    blob: str
    start_after: int = -1  # a token id: the grammar applies to what follows its first occurrence (R1's </think>)


SCHEDULER_GRAMMARS = 256
WORKER_GRAMMARS = 64


class AddRequest(Message):
    """With params.n > 1 the scheduler runs n completions, reported and aborted by the ids
    completion_ids(req_id, n) gives."""
    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    priority: int = 0  # lower runs sooner; only with the "priority" scheduling policy
    grammar: GrammarPlan | None = None  # set exactly when params.structured_outputs is


def completion_ids(req_id: str, n: int) -> list[str]:
    """A request's own id when it has one completion, or when n is out of range (it is refused
    under that id)."""
    if not 2 <= n <= MAX_PARALLEL_SAMPLES:
        return [req_id]
    return [f"{req_id}/{i}" for i in range(n)]


class AbortRequests(Message):
    req_ids: list[str]


class GetStats(Message):
    pass


class Shutdown(Message):
    pass


class EngineReady(Message):
    num_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    kv_cache_tokens: int
    kv_bytes_per_token: int
    step_peak_bytes: int = 0  # the largest step's memory beyond weights and cache, per rank (the most of any)


class TokenLogprobs(Message):
    token_id: int
    logprob: float
    rank: int
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class RequestDelta(Message):
    req_id: str
    new_token_ids: list[int] = []
    logprobs: list[TokenLogprobs] = []
    prompt_logprobs: list[TokenLogprobs | None] = []
    finished: bool = False
    finish_reason: str | None = None  # "length", "stop", "abort", "error"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    first_token_time: float = 0.0
    finish_time: float = 0.0
    scheduled_time: float = 0.0


class RequestOutputs(Message):
    deltas: list[RequestDelta]


class TierStats(Message):
    """The prefix cache's lower tiers, summed over ranks (cache/tiers.py)."""
    host_hit_tokens: int  # prompt tokens loaded from host memory instead of computed
    disk_hit_tokens: int  # prompt tokens read back from disk instead of computed
    bytes_pool_to_host: int
    bytes_host_to_pool: int
    bytes_host_to_disk: int
    bytes_disk_to_host: int
    reads_failed: int  # block files that were missing, truncated, corrupt or foreign: misses
    copy_seconds: float  # workers' time copying between the pool and host memory, on the step's path
    host_blocks: int
    host_blocks_used: int
    disk_blocks: int
    disk_blocks_used: int


class EngineStats(Message):
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_steps: int
    prompt_tokens: int  # prompt tokens of admitted requests
    computed_prompt_tokens: int  # prefill tokens actually run through the model
    generation_tokens: int
    prefix_cache_queries: int  # tokens looked up in the prefix cache
    prefix_cache_hits: int  # tokens found there
    num_free_blocks: int
    num_blocks: int
    metrics: MetricsSnapshot | None = None
    spec_num_drafts: int = 0  # verifications with at least one draft
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = []
    spec_draft_lengths: list[int] = []  # [k + 1]: sampling steps of a request that proposed d drafts
    spec_step_draft_length: int = 0  # the draft length the policy chose for the latest step
    routed_tokens: list[int] = []  # per routed expert, since start, summed over MoE layers and ranks
    num_ranks: int = 1
    rank_running: list[int] = []  # requests running per expert-parallel rank
    rank_requests: list[int] = []  # requests placed on each rank since start
    idle_rank_steps: int = 0  # (step, rank) pairs where a rank had no tokens and only served the others
    kv_tiers: TierStats | None = None  # without kv_offload_memory or kv_disk_cache_dir: None
    # Over the last reports of per-layer expert load (engine/expert_load.py): per MoE layer the
    # most loaded rank over the mean rank, averaged over layers; and each rank's load, all layers.
    moe_imbalance: float = 0.0
    moe_window_rank_load: list[int] = []
    # With EPLB: choices each rank's slots received since start (the placement's, not the static
    # ranges'), re-placements made, slots whose expert changed in them, and the longest and the
    # latest switch's time on the slowest rank.
    rank_routed_tokens: list[int] = []
    eplb_rebalances: int = 0
    eplb_moved_slots: int = 0
    eplb_max_seconds: float = 0.0
    eplb_last_seconds: float = 0.0


class EngineDead(Message):
    reason: str


class EngineHeartbeat(Message):
    """The scheduler process's sign of life to the frontend, every HEARTBEAT_INTERVAL_S."""


# ---- scheduler <-> worker ---------------------------------------------------------------------

class NewRequestPlan(Message):
    """A request new to the worker (or recomputed after preemption), in full."""
    req_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    params: SamplingParams
    block_ids: list[int]
    num_computed: int
    num_scheduled: int
    grammar: GrammarPlan | None = None


class StepPlan(Message):
    """Running requests travel as columns: running_ids[i] computes running_num_scheduled[i]
    tokens and has the blocks running_new_blocks[i] appended to its table."""
    step_id: int
    new: list[NewRequestPlan] = []
    running_ids: list[str] = []
    running_num_scheduled: list[int] = []
    running_new_blocks: list[list[int]] = []
    finished_ids: list[str] = []  # finished, aborted or preempted since the last step: drop state
    # Before the step runs, block copy_dst[i] takes block copy_src[i]'s entries, every layer: the
    # tail of a prompt (past its last full block) that a completion of n shares with the first.
    copy_src: list[int] = []
    copy_dst: list[int] = []
    # The prefix cache's lower tiers (cache/tiers.py plans them, cache/tier_store.py runs them).
    # Before the step, in this order: cached blocks the step reuses are copied down into host
    # slots (offload_blocks[i] -> offload_slots[i]), then host slots are loaded into the blocks
    # that take them (load_slots[i] -> load_blocks[i]). After that, on the worker's I/O thread:
    # write_slots[i] is written to disk as write_keys[i] (tokens: write_tokens, block_size each),
    # the files of delete_keys are removed, and read_keys[i] is read into read_slots[i] (checked
    # against read_tokens) and reported in a later StepResult. await_reads: nothing else to do but
    # wait (a short while) for reads a waiting request needs.
    offload_blocks: list[int] = []
    offload_slots: list[int] = []
    load_slots: list[int] = []
    load_blocks: list[int] = []
    write_keys: list[bytes] = []
    write_slots: list[int] = []
    write_tokens: list[int] = []
    delete_keys: list[bytes] = []
    read_keys: list[bytes] = []
    read_slots: list[int] = []
    read_tokens: list[int] = []
    await_reads: bool = False
    # Speculative decoding (scheduler/spec_policy.py): after this step, each request that samples
    # proposes up to num_drafts MTP drafts, or draft_caps[req_id] where that is lower. 0: the MTP
    # layer does not run this step. Expert-parallel ranks all get the same num_drafts (their MTP
    # passes meet in the same collectives).
    num_drafts: int = 0
    draft_caps: dict[str, int] = {}
    # EPLB (engine/eplb.py): before this step every rank switches these MoE layers (by layer index)
    # to their new placements, the logical expert of each slot; empty: no change.
    expert_placement: dict[int, list[int]] = {}


class StepResult(Message):
    """Columnar, so that a step of hundreds of decodes is a few flat lists on the wire.
    req_ids[i] produced token_ids[i] (empty for a prefill chunk that only returns prompt logprobs;
    several when drafts were accepted) and, with speculative decoding, proposes draft_ids[i]
    (kept by the worker too: the next plan only says how many of them to verify)."""
    step_id: int
    req_ids: list[str] = []
    token_ids: list[list[int]] = []
    draft_ids: list[list[int]] = []  # empty when speculative decoding is off
    rank: int = 0
    routed_tokens: list[int] = []  # expert choices routed per expert (global ids) by this rank's tokens
    # Every report_steps steps (engine/expert_load.py): the same per MoE layer since the last
    # report, int32 [moe layers, experts] little-endian (bytes: cheap to send and to sum).
    layer_load: bytes = b""
    slot_load: bytes = b""  # with EPLB, in the same reports: int32 [moe layers, slots], per physical slot
    eplb_seconds: float = 0.0  # with EPLB: the time this step spent switching placements (moving experts)
    logprobs: dict[str, list[TokenLogprobs]] = {}
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = {}
    failed: dict[str, str] = {}  # requests the worker gave up on (a grammar too slow to match): the error
    reads_done: list[bytes] = []  # disk reads finished since the last result (StepPlan.read_keys)
    reads_failed: list[bytes] = []  # missing, truncated, corrupt or foreign files: misses
    writes_failed: list[bytes] = []  # disk writes that did not happen (a full disk)
    tier_copy_seconds: float = 0.0  # time this step spent copying between the pool and host slots
    # The step's time in the main model (forward and sampling), and the rows and time of each
    # MTP drafting pass after it: what the draft-length policy's cost model learns from.
    forward_seconds: float = 0.0
    draft_rows: list[int] = []
    draft_seconds: list[float] = []


class WorkerReady(Message):
    rank: int
    num_blocks: int
    kv_bytes_per_token: int
    vocab_size: int
    max_model_len: int
    step_peak_bytes: int = 0
    host_blocks: int = 0  # slots of the host tier (kv_offload_memory)
    disk_blocks: int = 0  # files the disk tier may hold (kv_disk_cache_size)
    disk_keys: list[bytes] = []  # the disk tier's blocks found at start, oldest first


class WorkerHeartbeat(Message):
    """Sent every HEARTBEAT_INTERVAL_S by a thread of each worker: the watchdog's sign of life."""
    rank: int


HEARTBEAT_INTERVAL_S = 0.5


class WorkerFailed(Message):
    rank: int
    error: str


FrontendToScheduler = AddRequest | AbortRequests | GetStats | Shutdown
SchedulerToFrontend = EngineReady | RequestOutputs | EngineStats | EngineDead | EngineHeartbeat
SchedulerToWorker = StepPlan | Shutdown
WorkerToScheduler = WorkerReady | StepResult | WorkerFailed | WorkerHeartbeat
