"""The worker's engine room: weights, the physical latent cache, and one step's execution."""

from __future__ import annotations

import ctypes

import torch

from cache.latent_cache import LatentCache
from engine.config import EngineConfig
from engine.messages import StepPlan, StepResult, TokenLogprobs
from engine.model_config import ModelConfig
from engine.worker_state import ScheduledWork, WorkerState
from kernels.backend import triton_wanted
from model.deepseek_v3 import DeepseekV3
from model.forward_batch import ForwardBatch, SequenceChunk
from model.loader import load_weights
from model.sampler import SampleRow, prompt_logprob_entries, sample

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
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


def max_model_len(config: EngineConfig, cfg: ModelConfig) -> int:
    return min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.dtype = DTYPES[config.dtype]
        self.device = resolve_device(config.device)
        self.cfg = ModelConfig.from_checkpoint(config.model_dir)
        self.max_model_len = max_model_len(config, self.cfg)
        # The GPU path keeps the checkpoint's FP8 weights for the FP8 kernels; the CPU path dequantizes.
        keep_fp8 = triton_wanted(torch.empty(0, device=self.device))
        weights = load_weights(config.model_dir, self.cfg, self.dtype, include_mtp=False, keep_fp8=keep_fp8)
        self.model = DeepseekV3(self.cfg, weights, max_positions=self.max_model_len).to(self.device)
        del weights
        self.kv_bytes_per_token = LatentCache.bytes_per_token(self.cfg.num_cache_layers, self.cfg.kv_entry_dim,
                                                              self.dtype)
        budget = config.kv_cache_memory
        if budget is None:
            budget = int(available_memory(self.device) * config.kv_cache_memory_fraction)
        num_blocks = budget // (self.kv_bytes_per_token * config.block_size)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory {budget} bytes holds no block of {config.block_size} tokens "
                             f"({self.kv_bytes_per_token} bytes per token)")
        self.cache = LatentCache(self.cfg.num_cache_layers, num_blocks, config.block_size, self.cfg.kv_entry_dim,
                                 self.dtype, self.device)
        self._cache_layers = [self.cache.layer(i) for i in range(self.cfg.num_cache_layers)]
        self.state = WorkerState()

    def release_idle_memory(self) -> None:
        """Drops the attention gather buffer (sized by the largest step so far) and returns freed
        heap to the OS: without this a long-running worker's resident memory keeps its peak."""
        self.model.gather_buffer.release()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        _malloc_trim()

    @property
    def num_blocks(self) -> int:
        return self.cache.num_blocks

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        work = self.state.apply(plan)
        if not work:
            return StepResult(plan.step_id)
        chunks = [SequenceChunk(w.tokens, w.req.num_computed, w.req.block_table) for w in work]
        batch = ForwardBatch.build(chunks, self.config.block_size, self.device)
        hidden = self.model(batch, self._cache_layers)

        due = [i for i, w in enumerate(work) if w.samples]
        rows = [SampleRow(w.req_id, w.params, w.token_ids[: w.num_prompt_tokens], w.output_ids)
                for w in (work[i].req for i in due)]
        tokens: list[int] = []
        logprobs: list[list[TokenLogprobs]] = []
        if due:
            last = torch.tensor([batch.query_start[i + 1] - 1 for i in due], device=hidden.device)
            tokens, logprobs = sample(self.model.logits(hidden[last]).cpu(), rows, self.cfg.eos_token_id,
                                      self.config.seed)
        sampled = {r.req_id: [t] for r, t in zip(rows, tokens)}
        result = StepResult(plan.step_id)
        for r, lp in zip(rows, logprobs):
            if lp:
                result.logprobs[r.req_id] = lp
        for i, w in enumerate(work):
            rid = w.req.req_id
            plp = self._prompt_logprobs(w, hidden[batch.query_start[i] : batch.query_start[i + 1]])
            if plp:
                result.prompt_logprobs[rid] = plp
            if rid in sampled or plp:
                result.req_ids.append(rid)
                result.token_ids.append(sampled.get(rid, []))
        WorkerState.advance(work, sampled)
        return result

    def _prompt_logprobs(self, w: ScheduledWork, hidden: torch.Tensor) -> list[TokenLogprobs | None]:
        """Entries for the prompt tokens this chunk predicts (the first prompt token gets None)."""
        n = w.req.params.prompt_logprobs
        start, num_prompt = w.req.num_computed, w.req.num_prompt_tokens
        if n is None or start >= num_prompt:
            return []
        stop = min(start + w.num_tokens, num_prompt - 1)  # position p predicts prompt token p + 1
        entries: list[TokenLogprobs | None] = [None] if start == 0 else []
        if stop > start:
            logits = self.model.logits(hidden[: stop - start]).cpu()
            entries += prompt_logprob_entries(logits, w.req.token_ids[start + 1 : stop + 1], n)
        return entries
