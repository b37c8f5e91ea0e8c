"""The worker's engine room: weights, the physical latent cache, and one step's execution."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable

import torch

from cache.latent_cache import LatentCache
from cache.tier_store import TierStore, cache_fingerprint
from engine.config import EngineConfig
from engine.decode_graphs import CudaGraphReplay, DecodeGraphs, RerunReplay
from engine.eplb import initial_placements
from engine.expert_load import report_steps
from engine.memory_profile import (
    available_memory,
    cache_budget,
    keep_freed_heap,
    measure_step_peak,
    trim_host_heap,
)
from engine.messages import StepPlan, StepResult, TokenLogprobs
from engine.model_config import ModelConfig
from engine.mtp_proposer import MTPProposer
from engine.step_threads import StepThreads
from engine.warmup import compile_kernels
from engine.worker_state import ScheduledWork, WorkerState
from kernels import native
from kernels.backend import set_batch_invariant, triton_wanted
from kernels.forward_batch import ForwardBatch, SequenceChunk
from model.deepseek_v3 import DeepseekV3
from model.expert_parallel import ExpertParallel, init_distributed, leave_distributed
from model.grammar_mask import GrammarMasks
from model.loader import load_weights
from model.logit_edits import TokenHistory
from model.moe import MoE
from model.mtp import MTPModule
from model.sampler import SampleRow, draft_rows, greedy_verify, prompt_logprob_entries, speculative_sample

log = logging.getLogger("mlaserve.worker")

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# Host slots a disk tier stages its reads in when kv_offload_memory gives it none: the longest
# prefix one request reads back from disk at once.
DISK_STAGING_BLOCKS = 64
# How long a step with nothing to compute waits for the disk reads a waiting request needs.
AWAIT_READS_S = 0.05


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return device


def share_host_cores(num_local_workers: int) -> None:
    """Expert-parallel workers on one host's CPU each take their share of its cores: torch's
    default (every core, per process) puts N x cores threads on the cores, and their spin-waiting
    in each parallel region stalled the steps (4 ranks on 2 cores: the EP-4 test with EPLB 23.1 s ->
    8.8 s, EP 2 6.6 -> 4.2 s). OMP_NUM_THREADS, where set, is the user's choice."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # (macOS)
    torch.set_num_threads(max(1, cores // num_local_workers))


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0):
        self.config = config
        self.rank = rank
        self.dtype = DTYPES[config.dtype]
        self.device = resolve_device(config.device)
        self.step_threads = self._host_threads() if self.device == "cpu" else None
        if self.device == "cuda" and config.ep_size > 1:  # one GPU per worker: the host's n-th for its n-th rank
            n = rank - config.local_ranks.start
            if n >= torch.cuda.device_count():
                raise ValueError(f"rank {rank} is this host's worker {n} and needs its GPU {n}, but torch sees "
                                 f"{torch.cuda.device_count()}: ep_size / nnodes must not exceed a host's GPUs")
            self.device = f"cuda:{n}"
        if self.device.startswith("cuda:"):
            torch.cuda.set_device(self.device)  # (NCCL's collectives use the current device)
        self.cfg = ModelConfig.from_checkpoint(config.model_dir)
        set_batch_invariant(config.batch_invariant)
        # The GPU path keeps the checkpoint's FP8 weights for the FP8 kernels; the CPU path dequantizes.
        self.on_kernels = triton_wanted(torch.empty(0, device=self.device))
        if config.batch_invariant and not self.on_kernels:
            log.warning("batch_invariant applies to the kernel path (a GPU, or MLASERVE_KERNELS=triton): "
                        "this worker runs the CPU's and torch's kernels, whose rows may change with the batch")
        self.max_model_len = config.served_model_len(self.cfg.max_position_embeddings)
        if not self.on_kernels:
            keep_freed_heap()
            native.prebuild()  # built now (or found built), not inside the first step
        self.num_spec = config.num_speculative_tokens
        if self.num_spec and self.cfg.num_nextn_predict_layers < 1:
            raise ValueError(f"num_speculative_tokens={self.num_spec} needs an MTP module, and {config.model_dir} "
                             "has none (num_nextn_predict_layers is 0)")
        self._load_model()
        self.history = TokenHistory(self.cfg.vocab_size, self.device)  # the penalties' token counts
        self._make_cache()
        self.state = WorkerState()
        self.proposer = None if self.mtp is None else MTPProposer(
            self.mtp, self._cache_layers[self.mtp.layer_idx], self.num_spec, config.block_size, self.device,
            self.max_model_len, self.model.ep is not None)
        if self.on_kernels and self.device.startswith("cuda") and self.model.ep is None:
            compile_kernels(self.model, self._cache_layers, self.moes, config.block_size, self.num_blocks,
                            config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len, self.device)
        self._make_graphs()
        # Structured outputs' vocabulary loads on a thread of its own from here: after the
        # cache is sized, so the measured step does not count it.
        self.grammars = GrammarMasks(config.model_dir, self.cfg.vocab_size, self.cfg.eos_token_id)
        self._constrained: list[tuple] = []  # this step's (grammar, req id) pairs, set by _sample
        self._grammar_failures: dict[str, str] = {}

    def _host_threads(self) -> StepThreads | None:
        """Sets this CPU worker's torch threads; the per-step choice of a count up to its share,
        where it has one (bf16: the compiled kernels, whose results do not depend on the count)."""
        config = self.config
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        elif len(config.local_ranks) > 1:
            share_host_cores(len(config.local_ranks))
        share = torch.get_num_threads()
        native.set_split_threads(share)
        if config.cpu_threads or share < 2 or self.dtype != torch.bfloat16 or config.batch_invariant:
            return None
        return StepThreads(share)

    def _load_model(self) -> None:
        config, rank = self.config, self.rank
        ep = None
        if config.ep_size > 1:
            init_distributed(rank, config.ep_size, config.master_addr, config.master_port, self.device)
            # Rank 0's placement for every rank: it runs on the scheduler's host and reads the load
            # file the scheduler reads; another host's copy of it may differ or be missing.
            placements = [initial_placements(config, self.cfg) if rank == 0 else None]
            if config.enable_eplb:
                torch.distributed.broadcast_object_list(placements, src=0)
            ep = ExpertParallel(rank, config.ep_size, self.cfg.n_routed_experts, config.num_redundant_experts,
                                placements[0])
        # Each rank reads only the routed experts its slots hold from the shards.
        weights = load_weights(config.model_dir, self.cfg, self.dtype, experts=ep.local_experts if ep else None,
                               include_mtp=self.num_spec > 0, keep_fp8=self.on_kernels)
        # Chained drafting reads rope tables k positions past the last verified token. A step's
        # prefill chunks without cached prefixes hold at most one long context (a prompt resumed
        # after earlier chunks) and the step's own tokens: such steps expand in one group.
        max_positions = self.max_model_len + self.num_spec
        self.model = DeepseekV3(self.cfg, weights, max_positions=max_positions, ep=ep,
                                prefill_expand_limit=max_positions + config.max_num_batched_tokens).to(self.device)
        self.mtp = MTPModule(self.cfg, weights, self.model).to(self.device) if self.num_spec else None
        modules = [*self.model.modules(), *(self.mtp.modules() if self.mtp is not None else ())]
        self.moes = [m for m in modules if isinstance(m, MoE)]  # found once, read every step
        self._layer_load = torch.zeros(len(self.moes), self.cfg.n_routed_experts, dtype=torch.int64,
                                       device=self.device)
        self._balanced = [m for m in self.moes if m.placement is not None]  # (EPLB: all of them, or none)
        self._balanced_by_layer = {m.layer_idx: m for m in self._balanced}
        self._slot_load = torch.zeros(len(self._balanced), ep.num_slots if self._balanced else 0,
                                      dtype=torch.int64, device=self.device)
        self._report_steps = report_steps(config)
        self._steps_since_report = 0
        self._eplb_seconds = 0.0
        del weights
        if self.device.startswith("cuda"):
            # cuDNN's attention builds an execution plan for each new pair of query and key
            # lengths, on the host, and every prefill chunk brings new ones: it took 59% of the
            # worker's time in the H100 throughput run. Flash / memory-efficient attention do not.
            torch.backends.cuda.enable_cudnn_sdp(False)

    def _make_cache(self) -> None:
        """Sizes the latent cache (engine/memory_profile.py) and allocates it."""
        config = self.config
        fp8_cache = config.kv_cache_dtype == "fp8"
        cache_shape = (self.cfg.num_cache_layers, self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim)
        self.kv_bytes_per_token = LatentCache.bytes_per_token(*cache_shape, self.dtype, fp8_cache)
        # A host's cache of a given size is the OS's to fit: a step is measured there only when
        # the cache is sized from what is available (it costs a prefill step at start-up).
        measure = self.device.startswith("cuda") or config.kv_cache_memory is None
        self.step_peak_bytes = measure_step_peak(self, cache_shape, fp8_cache) if measure else 0
        budget = cache_budget(config, self.device, self.max_model_len, self.step_peak_bytes)
        num_blocks = budget // (self.kv_bytes_per_token * config.block_size)
        # CUDA graphs pad their batches with rows that write into a block of their own: the pool's
        # last, which the scheduler never sees.
        self._with_graphs = config.cuda_graphs and self.on_kernels and self.model.ep is None
        self._usable_blocks = num_blocks - (1 if self._with_graphs else 0)
        if self._usable_blocks < 1:
            raise ValueError(f"a latent cache of {budget} bytes holds no block of {config.block_size} tokens "
                             f"({self.kv_bytes_per_token} bytes per token)"
                             + (" beside the CUDA graphs' padding block" if self._with_graphs else ""))
        self.cache = LatentCache(cache_shape[0], num_blocks, config.block_size, *cache_shape[1:], self.dtype,
                                 self.device, fp8_cache)
        self._cache_layers = [self.cache.layer(i) for i in range(self.cfg.num_cache_layers)]
        self.tiers = self._make_tiers(fp8_cache) if config.tiered_prefix_cache else None

    def _make_tiers(self, fp8_cache: bool) -> TierStore:
        c = self.config
        block_bytes = self.kv_bytes_per_token * c.block_size
        host_blocks = (c.kv_offload_memory or 0) // block_bytes
        if c.kv_disk_cache_dir:
            host_blocks = max(host_blocks, DISK_STAGING_BLOCKS)
        if host_blocks * block_bytes > (available := available_memory("cpu")):
            raise ValueError(f"the prefix cache's host tier needs {host_blocks * block_bytes} bytes "
                             f"(kv_offload_memory {c.kv_offload_memory}), more than the {available} bytes of "
                             f"memory this host has available")
        # Without speculation the MTP layer's entries are never written: such blocks cannot serve
        # an engine that drafts, so the layers that hold valid entries are part of the fingerprint.
        valid_layers = self.cfg.num_cache_layers if self.num_spec else self.cfg.num_hidden_layers
        fingerprint = cache_fingerprint(c.model_dir, self.dtype, fp8_cache, c.block_size, valid_layers)
        return TierStore(self.cache, host_blocks, c.kv_disk_cache_dir, c.kv_disk_cache_size, fingerprint, self.rank)

    def _make_graphs(self) -> None:
        self.graphs: DecodeGraphs | None = None
        if self._with_graphs:
            # Where the kernels run on the CPU (the interpreter, in tests) the same buffers and
            # padding run with a rerun in place of each graph.
            make = functools.partial(CudaGraphReplay, torch.cuda.graph_pool_handle()) if self.device.startswith(
                "cuda") else RerunReplay
            c = self.config
            self.graphs = DecodeGraphs(self.model, self._cache_layers, c.block_size, c.max_num_seqs,
                                       self.max_model_len, self.cache.num_blocks - 1, make,
                                       self.mtp if self.num_spec else None, 1 + self.num_spec)
            if self.proposer is not None:
                self.proposer.graphs = self.graphs

    def release_idle_memory(self) -> None:
        """Drops the attention gather buffer (sized by the largest step so far) and returns freed
        heap to the OS: without this a long-running worker's resident memory keeps its peak."""
        self.model.gather_buffer.release()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        trim_host_heap()

    def close(self) -> None:
        """An orderly exit: expert-parallel ranks leave their group together (the last step, run
        just before Shutdown with asynchronous scheduling, may still be finishing on a peer), so
        no rank's communication threads see a peer vanish mid-exit."""
        if self.tiers is not None:
            self.tiers.close()
        if self.model.ep is not None:
            leave_distributed()
        if self.step_threads is not None:  # (a runner in a test's process puts its share back)
            torch.set_num_threads(self.step_threads.share)
            native.set_split_threads(None)

    @property
    def num_blocks(self) -> int:
        """Blocks the scheduler may hand out."""
        return self._usable_blocks

    @torch.inference_mode()
    def execute(self, plan: StepPlan, publish: Callable[[StepResult], None] | None = None) -> StepResult:
        """Runs one step. `publish`, when given, gets the result as soon as it is known, before
        this worker's own bookkeeping for the next step, so the scheduler's work overlaps it."""
        if plan.expert_placement:  # (before anything else: every rank switches before this step)
            self._switch_placement(plan.expert_placement)
        work = self.state.apply(plan)
        self.history.forget(plan.finished_ids)
        for n in plan.new:
            if n.grammar is not None:
                self.state.requests[n.req_id].grammar = self.grammars.request(n.grammar, n.output_ids)
        if self.tiers is not None:  # (first: the blocks it copies down may be the tail copies' targets)
            self.tiers.apply(plan)
        if plan.copy_src:
            self.cache.copy_blocks(plan.copy_src, plan.copy_dst)
        if not work:
            return self._idle_step(plan, publish)
        if self.step_threads is not None:
            # (A step past the compiled linear's rows runs torch's matmul, whose sums may split
            # with the count: on the share always.)
            tokens = sum(w.num_tokens for w in work)
            self.step_threads.choose(tokens, measured=tokens <= native.linear_max_rows())
        started = time.perf_counter()
        query_start, hidden, batch = self._forward(work)
        due = [i for i, w in enumerate(work) if w.samples]
        emitted, logprobs = self._sample(work, due, query_start, hidden)  # (its .tolist() waits for the device)
        sampled = {work[i].req.req_id: toks for i, toks in zip(due, emitted)}
        forwarded = time.perf_counter()
        drafts = {}
        if self.proposer is not None:
            drafts = self.proposer.propose(work, hidden, sampled, plan.num_drafts, batch)
        result = self._result(plan, work, query_start, hidden, sampled, drafts)
        result.forward_seconds = forwarded - started
        if self.proposer is not None and self.proposer.passes:
            result.draft_rows = [rows for rows, _ in self.proposer.passes]
            result.draft_seconds = [seconds for _, seconds in self.proposer.passes]
        for i, lp in zip(due, logprobs):
            if lp:
                result.logprobs[work[i].req.req_id] = lp
        if publish is not None:
            publish(result)
        if self.step_threads is not None:
            self.step_threads.record(time.perf_counter() - started)
        for g, rid in self._constrained:  # the grammars take what was emitted
            g.accept(sampled[rid])
            if (error := g.end_step()) is not None:
                self._grammar_failures[rid] = error  # (reported with the next step's result)
        WorkerState.advance(work, sampled, drafts)
        return result

    def _idle_step(self, plan: StepPlan, publish: Callable[[StepResult], None] | None) -> StepResult:
        if self.model.ep is not None:  # the other ranks' tokens still need this rank's experts
            self.model.idle_forward()
            for _ in range(min(plan.num_drafts, self.num_spec)):
                self.mtp.idle_forward()
        if plan.await_reads and self.tiers is not None:
            self.tiers.wait_for_reads(AWAIT_READS_S)
        result = StepResult(plan.step_id, rank=self.rank)
        self._routed_tokens(result)
        if self.tiers is not None:
            self.tiers.report(result)
        if publish is not None:
            publish(result)
        return result

    def _forward(self, work: list[ScheduledWork]) -> tuple[list[int], torch.Tensor, ForwardBatch | None]:
        """The step's hidden states, where each request's tokens start among them, and the
        batch (None where a CUDA graph ran the step)."""
        chunks = [SequenceChunk(w.tokens, w.req.num_computed, w.req.block_table) for w in work]
        size = self.graphs.size_for(chunks) if self.graphs is not None else None
        if size is not None:  # a decode step: replayed from its graph
            query_start = [0]
            for c in chunks:
                query_start.append(query_start[-1] + len(c.token_ids))
            return query_start, self.graphs.run(chunks, size), None
        if self.graphs is not None:
            self.graphs.size = None  # (the MTP layer's first pass runs eagerly too)
        batch = ForwardBatch.build(chunks, self.config.block_size, self.device)
        return batch.query_start, self.model(batch, self._cache_layers), batch

    def _result(self, plan: StepPlan, work: list[ScheduledWork], query_start: list[int], hidden: torch.Tensor,
                sampled: dict[str, list[int]], drafts: dict[str, list[int]]) -> StepResult:
        """The step's tokens, drafts and prompt logprobs for each request that has any."""
        result = StepResult(plan.step_id, rank=self.rank)
        self._routed_tokens(result)
        if self._grammar_failures:
            result.failed, self._grammar_failures = self._grammar_failures, {}
        if self.tiers is not None:
            self.tiers.report(result)
        for i, w in enumerate(work):
            rid = w.req.req_id
            plp = self._prompt_logprobs(w, hidden[query_start[i] : query_start[i + 1]])
            if plp:
                result.prompt_logprobs[rid] = plp
            if rid in sampled or plp:
                result.req_ids.append(rid)
                result.token_ids.append(sampled.get(rid, []))
                if self.mtp is not None:
                    result.draft_ids.append(drafts.get(rid, []))
        return result

    def _sample(self, work: list[ScheduledWork], due: list[int], query_start: list[int], hidden: torch.Tensor
                ) -> tuple[list[list[int]], list[list[TokenLogprobs]]]:
        """Per due request: the last known token's row, then one row per draft it verifies."""
        self._constrained = []
        if not due:
            return [], []
        if all(work[i].req.params.plain_greedy for i in due):
            return self._sample_greedy(work, due, query_start, hidden)
        positions, row_drafts, sizes = self._verification_rows(work, due, query_start)
        rows: list[SampleRow] = []
        constrained: list[tuple] = []  # (first row, grammar, drafts) of the requests under a grammar
        for i in due:
            w = work[i]
            r = w.req
            drafts = r.draft_ids[: w.num_drafts]
            if r.grammar is not None:
                constrained.append((len(rows), r.grammar, drafts))
                self._constrained.append((r.grammar, r.req_id))
            rows += draft_rows(SampleRow(r.req_id, r.params, r.token_ids, r.num_prompt_tokens), drafts)
        index = torch.tensor(positions, device=hidden.device)
        masks = self.grammars.bitmask(constrained) if constrained else None
        return speculative_sample(self.model.logits(hidden[index]), rows, row_drafts, sizes,
                                  self.cfg.eos_token_id, self.config.seed, self.history, masks)

    def _sample_greedy(self, work: list[ScheduledWork], due: list[int], query_start: list[int], hidden: torch.Tensor
                       ) -> tuple[list[list[int]], list[list[TokenLogprobs]]]:
        """_sample where every due request is plain greedy: the same rows, nothing built per row."""
        positions, row_drafts, sizes = self._verification_rows(work, due, query_start)
        index = torch.tensor(positions, device=hidden.device)
        return greedy_verify(self.model.logits(hidden[index]), row_drafts, sizes), [[] for _ in due]

    @staticmethod
    def _verification_rows(work: list[ScheduledWork], due: list[int], query_start: list[int]
                           ) -> tuple[list[int], list[int], list[int]]:
        """Per due request its last known token's row, then one row per draft it verifies: the
        rows' positions in the step, each row's draft (-1 on a request's last row), group sizes."""
        positions: list[int] = []
        row_drafts: list[int] = []
        sizes: list[int] = []
        for i in due:
            w = work[i]
            first = query_start[i] + w.num_known - 1
            if w.num_drafts:
                row_drafts += w.req.draft_ids[: w.num_drafts]
                positions += range(first, first + w.num_drafts + 1)
            else:
                positions.append(first)
            row_drafts.append(-1)
            sizes.append(w.num_drafts + 1)
        return positions, row_drafts, sizes

    def _routed_tokens(self, result: StepResult) -> None:
        """Expert choices routed since the last step, per expert, summed over MoE layers; and
        every report_steps steps the per-layer counts since the last report (on the device
        until then: one small read per step, as before, and one per report)."""
        if not self.moes:
            return
        per_layer = torch.stack([m.routed_tokens for m in self.moes])
        if self._balanced:
            self._slot_load += torch.stack([m.slot_tokens for m in self._balanced])
        for m in self.moes:
            m.reset_load()
        self._layer_load += per_layer
        result.routed_tokens = per_layer.sum(0).tolist()
        result.eplb_seconds, self._eplb_seconds = self._eplb_seconds, 0.0
        self._steps_since_report += 1
        if self._steps_since_report >= self._report_steps:
            result.layer_load = self._layer_load.to(torch.int32).cpu().numpy().tobytes()
            self._layer_load.zero_()
            if self._balanced:
                result.slot_load = self._slot_load.to(torch.int32).cpu().numpy().tobytes()
                self._slot_load.zero_()
            self._steps_since_report = 0

    def _switch_placement(self, placements: dict[int, list[int]]) -> None:
        """EPLB: these MoE layers to their new placements, weights moved over torch.distributed
        (every rank switches the same layers, in the same order, before the same step)."""
        started = time.perf_counter()
        for layer in sorted(placements):
            self._balanced_by_layer[layer].set_placement(placements[layer])
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()  # (the time is the move's, not the launch's)
        self._eplb_seconds += time.perf_counter() - started

    def _prompt_logprobs(self, w: ScheduledWork, hidden: torch.Tensor) -> list[TokenLogprobs | None]:
        """Entries for the prompt tokens this chunk predicts (the first prompt token gets None)."""
        n = w.req.params.prompt_logprobs
        start, num_prompt = w.req.num_computed, w.req.num_prompt_tokens
        if n is None or start >= num_prompt:
            return []
        stop = min(start + w.num_tokens, num_prompt - 1)  # position p predicts prompt token p + 1
        entries: list[TokenLogprobs | None] = [None] if start == 0 else []
        if stop > start:
            logits = self.model.logits(hidden[: stop - start])
            entries += prompt_logprob_entries(logits, w.req.token_ids[start + 1 : stop + 1], n)
        return entries
