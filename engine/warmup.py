"""Kernel compilation at start-up, before any request: Triton compiles a kernel on the first use
of each tile and variant, which the chosen tiles tie to the token count, so one prompt and one
decode batch of each power-of-two size run now and no request waits for the compiler (tens of
seconds on a fresh machine; later starts read Triton's on-disk cache). CUDA graphs of the decode
batches are captured beside it (engine/decode_graphs.py)."""

from __future__ import annotations

import torch

from kernels.forward_batch import ForwardBatch, SequenceChunk
from model.deepseek_v3 import DeepseekV3
from model.moe import MoE


@torch.inference_mode()
def compile_kernels(model: DeepseekV3, cache_layers: list[torch.Tensor], moes: list[MoE], block_size: int,
                    num_blocks: int, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                    device: str) -> None:
    """Nothing is cached yet, so the blocks written are free. (Expert-parallel ranks skip it:
    their steps must pair up across ranks.)"""
    limit = min(max_num_batched_tokens, num_blocks * block_size)
    blocks = list(range(num_blocks))
    context = min(1024, limit - 1, max_model_len - 1)  # long enough for the split-context variant
    t = 1
    while t <= limit:
        prompt = [SequenceChunk([0] * t, 0, blocks[: -(-t // block_size)])]
        decodes = [SequenceChunk([0], context, blocks[: context // block_size + 1])] * min(t, max_num_seqs)
        for chunks in (prompt, decodes):
            model.logits(model(ForwardBatch.build(chunks, block_size, device), cache_layers))
        t *= 2
    for moe in moes:
        moe.reset_load()
