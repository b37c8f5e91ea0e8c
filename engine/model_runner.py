"""The worker's engine room: weights, the physical latent cache, and one step's execution."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
from collections.abc import Callable

import torch

from cache.latent_cache import LatentCache
from engine.config import EngineConfig
from engine.decode_graphs import CudaGraphReplay, DecodeGraphs, RerunReplay
from engine.memory_profile import (
    GIB,
    PeakMeter,
    cuda_cache_budget,
    host_cache_budget,
    no_room_message,
    trim_host_heap,
    worst_step_chunks,
)
from engine.messages import StepPlan, StepResult, TokenLogprobs
from engine.model_config import ModelConfig
from engine.sampling_params import SamplingParams
from engine.worker_state import ScheduledWork, WorkerState
from kernels import native
from kernels.backend import set_batch_invariant, triton_wanted
from model.deepseek_v3 import DeepseekV3
from model.expert_parallel import ExpertParallel, init_distributed, leave_distributed
from model.forward_batch import ForwardBatch, SequenceChunk
from model.loader import load_weights
from model.moe import MoE
from model.mtp import MTPModule
from model.sampler import SampleRow, TokenHistory, draft_rows, prompt_logprob_entries, speculative_sample

log = logging.getLogger("mlaserve.worker")

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _keep_freed_heap() -> None:
    """A forward's activations are megabytes each: by default glibc maps each one fresh and hands
    it back when freed, so every op of every step page-faults its output in again. Serving them
    from a heap that keeps freed memory (up to 1 GiB, returned when idle by trim_host_heap) took a
    2048-token prefill step on the CPU from 324-348 ms to 234-252 ms."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TOP_PAD, 64 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return device


def available_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0):
        self.config = config
        self.rank = rank
        self.dtype = DTYPES[config.dtype]
        self.device = resolve_device(config.device)
        self.cfg = ModelConfig.from_checkpoint(config.model_dir)
        set_batch_invariant(config.batch_invariant)
        if config.batch_invariant and not triton_wanted(torch.empty(0, device=self.device)):
            log.warning("batch_invariant applies to the kernel path (a GPU, or MLASERVE_KERNELS=triton): "
                        "this worker runs the CPU's and torch's kernels, whose rows may change with the batch")
        self.max_model_len = config.served_model_len(self.cfg.max_position_embeddings)
        # The GPU path keeps the checkpoint's FP8 weights for the FP8 kernels; the CPU path dequantizes.
        keep_fp8 = triton_wanted(torch.empty(0, device=self.device))
        if not keep_fp8:
            _keep_freed_heap()
            native.prebuild()  # built now (or found built), not inside the first step
        self.num_spec = config.num_speculative_tokens
        if self.num_spec and self.cfg.num_nextn_predict_layers < 1:
            raise ValueError(f"num_speculative_tokens={self.num_spec} needs an MTP module, and {config.model_dir} "
                             "has none (num_nextn_predict_layers is 0)")
        ep = None
        if config.ep_size > 1:
            ep = ExpertParallel(rank, config.ep_size, self.cfg.n_routed_experts)
            init_distributed(rank, config.ep_size, config.master_addr, config.master_port, self.device)
        # Each rank reads only its own routed experts from the shards.
        weights = load_weights(config.model_dir, self.cfg, self.dtype, experts=ep.local if ep else None,
                               include_mtp=self.num_spec > 0, keep_fp8=keep_fp8)
        # Chained drafting reads rope tables k positions past the last verified token. A step's
        # prefill chunks without cached prefixes hold at most one long context (a prompt resumed
        # after earlier chunks) and the step's own tokens: such steps expand in one group.
        max_positions = self.max_model_len + self.num_spec
        self.model = DeepseekV3(self.cfg, weights, max_positions=max_positions, ep=ep,
                                prefill_expand_limit=max_positions + config.max_num_batched_tokens).to(self.device)
        self.mtp = MTPModule(self.cfg, weights, self.model).to(self.device) if self.num_spec else None
        modules = [*self.model.modules(), *(self.mtp.modules() if self.mtp is not None else ())]
        self._moes = [m for m in modules if isinstance(m, MoE)]  # found once, read every step
        del weights
        if self.device.startswith("cuda"):
            # cuDNN's attention builds an execution plan for each new pair of query and key
            # lengths, on the host, and every prefill chunk brings new ones: it took 59% of the
            # worker's time in the H100 throughput run. Flash / memory-efficient attention do not.
            torch.backends.cuda.enable_cudnn_sdp(False)
        fp8_cache = config.kv_cache_dtype == "fp8"
        cache_shape = (self.cfg.num_cache_layers, self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim)
        self.kv_bytes_per_token = LatentCache.bytes_per_token(*cache_shape, self.dtype, fp8_cache)
        self.history = TokenHistory(self.cfg.vocab_size, self.device)  # the penalties' token counts
        # A host's cache of a given size is the OS's to fit: a step is measured there only when
        # the cache is sized from what is available (it costs a prefill step at start-up).
        measure = self.device.startswith("cuda") or config.kv_cache_memory is None
        self.step_peak_bytes = self._measure_step_peak(cache_shape, fp8_cache) if measure else 0
        budget = self._cache_budget()
        num_blocks = budget // (self.kv_bytes_per_token * config.block_size)
        # CUDA graphs pad their batches with rows that write into a block of their own: the pool's
        # last, which the scheduler never sees.
        graphs = config.cuda_graphs and keep_fp8 and ep is None and not self.num_spec
        self._usable_blocks = num_blocks - (1 if graphs else 0)
        if self._usable_blocks < 1:
            raise ValueError(f"a latent cache of {budget} bytes holds no block of {config.block_size} tokens "
                             f"({self.kv_bytes_per_token} bytes per token)"
                             + (" beside the CUDA graphs' padding block" if graphs else ""))
        self.cache = LatentCache(cache_shape[0], num_blocks, config.block_size, *cache_shape[1:], self.dtype,
                                 self.device, fp8_cache)
        self._cache_layers = [self.cache.layer(i) for i in range(self.cfg.num_cache_layers)]
        self.state = WorkerState()
        if keep_fp8 and self.device.startswith("cuda") and ep is None:
            self._compile_kernels()
        self.graphs: DecodeGraphs | None = None
        if graphs:
            # Where the kernels run on the CPU (the interpreter, in tests) the same buffers and
            # padding run with a rerun in place of each graph.
            make = functools.partial(CudaGraphReplay, torch.cuda.graph_pool_handle()) if self.device.startswith(
                "cuda") else RerunReplay
            self.graphs = DecodeGraphs(self.model, self._cache_layers, config.block_size, config.max_num_seqs,
                                       self.max_model_len, num_blocks - 1, make)

    @torch.inference_mode()
    def _measure_step_peak(self, cache_shape: tuple[int, int, int], fp8_cache: bool) -> int:
        """Runs the largest step the scheduler can plan (engine/memory_profile.py), main model, MTP
        pass and sampler, on a one-block scratch cache; returns the bytes it raised memory by (0
        where that cannot be measured). Expert-parallel ranks all run it at the same point of their
        start, so its all-to-alls pair up."""
        c = self.config
        bs = c.block_size
        scratch = LatentCache(cache_shape[0], 1, bs, *cache_shape[1:], self.dtype, self.device, fp8_cache)
        layers = [scratch.layer(i) for i in range(cache_shape[0])]
        gen = torch.Generator().manual_seed(0)  # random tokens route like real ones; the global RNG stays as it was
        chunks = []
        for computed, n in worst_step_chunks(self.max_model_len, c.max_num_batched_tokens):
            tokens = torch.randint(self.cfg.vocab_size, (n,), generator=gen).tolist()
            chunks.append(SequenceChunk(tokens, computed, [0] * -(-(computed + n) // bs)))
        self.release_idle_memory()  # buffers sized by earlier forwards would hide the step's growth
        meter = PeakMeter(self.device)
        measured = meter.start()
        # Every page points at the one scratch block, which the prefill attention would take for a
        # shared prefix and expand once: without host tables it expands every context, as distinct
        # blocks would make it.
        batch = dataclasses.replace(ForwardBatch.build(chunks, bs, self.device), host_block_tables=None)
        hidden = self.model(batch, layers)
        if self.mtp is not None:
            self.mtp(batch, hidden, layers[self.mtp.layer_idx])
        # Every row of a full decode batch (with its drafts' rows) sampling the costliest way:
        # penalties, top-k/top-p that the head cannot settle, logprobs.
        n = min(c.max_num_seqs * (1 + self.num_spec), hidden.shape[0])
        params = SamplingParams(temperature=1.0, top_k=self.cfg.vocab_size, top_p=0.999, repetition_penalty=1.1,
                                frequency_penalty=0.1, logprobs=20, seed=0)
        # A request's rows (its drafts') share its id: the history holds one slot per request.
        rows = [SampleRow(f"memory-profile-{i // (1 + self.num_spec)}", params, chunks[0].token_ids, 1)
                for i in range(n)]
        speculative_sample(self.model.logits(hidden[:n]), rows, [-1] * n, [1] * n, self.cfg.eos_token_id,
                           c.seed, self.history)
        peak = meter.peak() if measured else 0
        self.history.forget([r.req_id for r in rows])
        for moe in self._moes:
            moe.routed_tokens.zero_()
        del hidden, scratch, layers
        self.release_idle_memory()
        return peak

    def _cache_budget(self) -> int:
        """Bytes for the latent cache: kv_cache_memory when given (on a GPU, checked against what is
        left), else gpu_memory_utilization of a GPU, or kv_cache_memory_fraction of the host's
        available memory, with a step's peak set aside."""
        c = self.config
        peak = self.step_peak_bytes
        limits = (self.max_model_len, c.max_num_batched_tokens, c.max_num_seqs)
        if self.device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            used = total - free
            in_use = f"{used / GIB:.2f} GiB are in use (weights, CUDA context, other processes)"
            budget = c.kv_cache_memory
            if budget is None:
                budget = cuda_cache_budget(total, used, peak, c.gpu_memory_utilization)
                if budget <= 0:
                    raise ValueError(no_room_message(
                        f"gpu_memory_utilization={c.gpu_memory_utilization} of {total / GIB:.1f} GiB", in_use, peak,
                        *limits))
            elif budget + used + peak > total:
                raise ValueError(no_room_message(f"kv_cache_memory={budget} on a {total / GIB:.1f} GiB device", in_use,
                                                 peak, *limits))
            return budget
        if c.kv_cache_memory is not None:
            return c.kv_cache_memory
        return host_cache_budget(available_memory(self.device), peak, c.kv_cache_memory_fraction)

    @torch.inference_mode()
    def _compile_kernels(self) -> None:
        """Triton compiles a kernel on the first use of each tile and variant, which the chosen
        tiles tie to the token count: one prompt and one decode batch of each power-of-two size
        now, so that no request waits for the compiler (tens of seconds on a fresh machine; later
        starts read Triton's on-disk cache). Nothing is cached yet, so the blocks written are free.
        (Expert-parallel ranks skip it: their steps must pair up across ranks.)"""
        bs = self.config.block_size
        limit = min(self.config.max_num_batched_tokens, self.num_blocks * bs)
        blocks = list(range(self.num_blocks))
        context = min(1024, limit - 1, self.max_model_len - 1)  # long enough for the split-context variant
        t = 1
        while t <= limit:
            prompt = [SequenceChunk([0] * t, 0, blocks[: -(-t // bs)])]
            decodes = [SequenceChunk([0], context, blocks[: context // bs + 1])] * min(t, self.config.max_num_seqs)
            for chunks in (prompt, decodes):
                self.model.logits(self.model(ForwardBatch.build(chunks, bs, self.device), self._cache_layers))
            t *= 2
        for moe in self._moes:
            moe.routed_tokens.zero_()

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
        if self.model.ep is not None:
            leave_distributed()

    @property
    def num_blocks(self) -> int:
        """Blocks the scheduler may hand out."""
        return self._usable_blocks

    @torch.inference_mode()
    def execute(self, plan: StepPlan, publish: Callable[[StepResult], None] | None = None) -> StepResult:
        """Runs one step. `publish`, when given, gets the result as soon as it is known, before
        this worker's own bookkeeping for the next step, so the scheduler's work overlaps it."""
        work = self.state.apply(plan)
        self.history.forget(plan.finished_ids)
        if plan.copy_src:
            self.cache.copy_blocks(plan.copy_src, plan.copy_dst)
        if not work:
            if self.model.ep is not None:  # the other ranks' tokens still need this rank's experts
                self.model.idle_forward()
                for _ in range(self.num_spec):
                    self.mtp.idle_forward()
            result = StepResult(plan.step_id, rank=self.rank, routed_tokens=self._routed_tokens())
            if publish is not None:
                publish(result)
            return result
        chunks = [SequenceChunk(w.tokens, w.req.num_computed, w.req.block_table) for w in work]
        size = self.graphs.size_for(chunks) if self.graphs is not None else None
        if size is not None:  # a decode step: replayed from its graph
            query_start = list(range(len(chunks) + 1))
            hidden = self.graphs.run(chunks, size)
        else:
            batch = ForwardBatch.build(chunks, self.config.block_size, self.device)
            query_start = batch.query_start
            hidden = self.model(batch, self._cache_layers)

        due = [i for i, w in enumerate(work) if w.samples]
        emitted, logprobs = self._sample(work, due, query_start, hidden)
        sampled = {work[i].req.req_id: toks for i, toks in zip(due, emitted)}
        drafts = self._propose(work, query_start, hidden, sampled) if self.mtp is not None else {}
        result = StepResult(plan.step_id, rank=self.rank, routed_tokens=self._routed_tokens())
        for i, lp in zip(due, logprobs):
            if lp:
                result.logprobs[work[i].req.req_id] = lp
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
        if publish is not None:
            publish(result)
        WorkerState.advance(work, sampled, drafts)
        return result

    def _sample(self, work: list[ScheduledWork], due: list[int], query_start: list[int], hidden: torch.Tensor
                ) -> tuple[list[list[int]], list[list[TokenLogprobs]]]:
        """Per due request: the last known token's row, then one row per draft it verifies."""
        if not due:
            return [], []
        rows: list[SampleRow] = []
        row_drafts: list[int] = []
        sizes: list[int] = []
        positions: list[int] = []
        for i in due:
            w = work[i]
            r = w.req
            drafts = r.draft_ids[: w.num_drafts]
            rows += draft_rows(SampleRow(r.req_id, r.params, r.token_ids, r.num_prompt_tokens), drafts)
            row_drafts += drafts + [-1]
            sizes.append(len(drafts) + 1)
            first = query_start[i] + w.num_known - 1
            positions += range(first, first + len(drafts) + 1)
        index = torch.tensor(positions, device=hidden.device)
        return speculative_sample(self.model.logits(hidden[index]), rows, row_drafts, sizes,
                                  self.cfg.eos_token_id, self.config.seed, self.history)

    def _propose(self, work: list[ScheduledWork], query_start: list[int], hidden: torch.Tensor,
                 sampled: dict[str, list[int]]) -> dict[str, list[int]]:
        """Runs the MTP module over every verified position of the step (which keeps its own cache
        layer complete), then chains it from each sampled request's last position for k drafts."""
        assert self.mtp is not None
        chunks, rows = [], []
        last: list[tuple[str, int]] = []  # (req id, row of its last MTP input) for requests that sampled
        verified_end: dict[str, int] = {}  # cached tokens once this step is folded in
        for i, w in enumerate(work):
            r = w.req
            emitted = sampled.get(r.req_id, [])
            valid = w.num_known + (len(emitted) - 1 if w.num_drafts else 0)
            start = r.num_computed
            # position p's input is the token at p + 1: the next known one, or what was just emitted
            nxt = r.token_ids[start + 1 : start + valid + 1]
            nxt += emitted[: valid - len(nxt)]
            chunks.append(SequenceChunk(nxt, start, r.block_table))
            rows += range(query_start[i], query_start[i] + valid)
            if emitted:
                last.append((r.req_id, len(rows) - 1))
                verified_end[r.req_id] = start + valid
        mtp_batch = ForwardBatch.build(chunks, self.config.block_size, self.device)
        mtp_cache = self._cache_layers[self.mtp.layer_idx]
        h = self.mtp(mtp_batch, hidden[torch.tensor(rows, device=hidden.device)], mtp_cache)
        by_id = {w.req.req_id: w for w in work}
        wanted = {rid: self._num_drafts(by_id[rid], sampled[rid]) for rid, _ in last}
        ids = [rid for rid, _ in last]
        if ids:
            h = h[torch.tensor([row for _, row in last], device=h.device)]
        drafts: dict[str, list[int]] = {rid: [] for rid in ids}
        # With expert parallelism every rank runs all k passes (idle ones join the collectives).
        for j in range(self.num_spec):
            if ids:
                for rid, t in zip(ids, self.mtp.logits(h).argmax(-1).tolist()):
                    drafts[rid].append(t)
            if j == self.num_spec - 1:
                break
            keep = [n for n, rid in enumerate(ids) if wanted[rid] > j + 1]
            ids = [ids[n] for n in keep]
            if ids:
                # draft j sits at verified_end + 1 + j, so the module reads it at position verified_end + j
                chain = [SequenceChunk([drafts[rid][-1]], verified_end[rid] + j, by_id[rid].req.block_table)
                         for rid in ids]
                h = self.mtp(ForwardBatch.build(chain, self.config.block_size, self.device),
                             h[torch.tensor(keep, device=h.device)], mtp_cache)
            elif self.model.ep is not None:
                self.mtp.idle_forward()
            else:
                break
        return {rid: d[: wanted[rid]] for rid, d in drafts.items()}

    def _routed_tokens(self) -> list[int]:
        """Expert choices routed since the last step, per expert, summed over MoE layers."""
        if not self._moes:
            return []
        total = sum(m.routed_tokens for m in self._moes)
        for m in self._moes:
            m.routed_tokens.zero_()
        return total.tolist()

    def _num_drafts(self, w: ScheduledWork, emitted: list[int]) -> int:
        """k, or fewer where the request would pass max_tokens or the context with them."""
        r = w.req
        num_tokens = len(r.token_ids) + len(emitted)
        left = min(r.params.max_tokens - (num_tokens - r.num_prompt_tokens), self.max_model_len - num_tokens)
        return max(0, min(self.num_spec, left - 1))

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
