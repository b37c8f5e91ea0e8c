"""Drives the model directly over a paged cache, for model-level tests (no engine processes)."""

from __future__ import annotations

import random

import torch

from cache.latent_cache import LatentCache
from engine.model_config import ModelConfig
from kernels.forward_batch import ForwardBatch, SequenceChunk
from model.deepseek_v3 import DeepseekV3


class PagedRunner:
    """Hands out blocks in a shuffled order so block tables are never contiguous."""

    def __init__(self, model: DeepseekV3, num_blocks: int = 256, block_size: int = 16, seed: int = 0,
                 device: str = "cpu", fp8_cache: bool = False):
        cfg: ModelConfig = model.cfg
        self.model = model
        self.block_size = block_size
        self.device = device
        self.cache = LatentCache(cfg.num_cache_layers, num_blocks, block_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                 model.dtype, device, fp8_cache)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}

    def _chunk(self, seq: int, tokens: list[int]) -> SequenceChunk:
        table = self.tables.setdefault(seq, [])
        done = self.computed.get(seq, 0)
        while len(table) * self.block_size < done + len(tokens):
            table.append(self.free.pop())
        return SequenceChunk(tokens, done, list(table))

    def step(self, work: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """work: seq id -> tokens to compute. Returns seq id -> logits of every computed token."""
        chunks = [self._chunk(s, toks) for s, toks in work.items()]
        batch = ForwardBatch.build(chunks, self.block_size, self.device)
        with torch.inference_mode():
            hidden = self.model(batch, [self.cache.layer(i) for i in range(self.model.cfg.num_cache_layers)])
            logits = self.model.logits(hidden)
        out = {}
        for i, (s, toks) in enumerate(work.items()):
            self.computed[s] = self.computed.get(s, 0) + len(toks)
            out[s] = logits[batch.query_start[i] : batch.query_start[i + 1]]
        return out

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Prefills every prompt in one batch, then decodes all of them together."""
        last = self.step({i: p for i, p in enumerate(prompts)})
        outputs: list[list[int]] = [[] for _ in prompts]
        for _ in range(max_new_tokens):
            nxt = {i: int(last[i][-1].argmax()) for i in range(len(prompts))}
            for i, t in nxt.items():
                outputs[i].append(t)
            last = self.step({i: [t] for i, t in nxt.items()})
        return outputs
