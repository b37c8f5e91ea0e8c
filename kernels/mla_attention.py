"""Paged MLA attention in the absorbed form, over the latent cache.

Queries arrive already mapped into latent space (q_latent = q_nope · W_UK per head) with their
rope part; every cache entry is [latent (kv_lora_rank) | rope key (qk_rope_head_dim)], shared by
all heads. score = q_latent·c + q_pe·k_pe; output = softmax · c (in latent space, [T, H, kv_lora_rank]).

This file holds the plain-torch reference used on the CPU. Sequences with few query tokens
(decode, speculative verification) are padded into one batched computation; each longer prefill
chunk is computed on its own, so padding never grows with the longest chunk times the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.forward_batch import ForwardBatch

# Sequences with at most this many query tokens share one padded computation.
SHORT_QUERY_MAX = 8


@dataclass
class AttentionGroup:
    token_index: torch.Tensor  # [B, Lq] flat token ids (padding points at a valid token)
    query_valid: torch.Tensor  # [B, Lq] bool
    block_index: torch.Tensor  # [B, n_blocks] physical blocks (padding points at block 0)
    mask: torch.Tensor  # [B, Lq, 1, n_blocks * block_size] True where the query may attend


def plan_attention(batch: ForwardBatch) -> list[AttentionGroup]:
    """Gather indices and causal masks, built once per step and shared by every layer."""
    q_lens = [batch.query_start[i + 1] - batch.query_start[i] for i in range(batch.num_seqs)]
    short = [i for i, n in enumerate(q_lens) if n <= SHORT_QUERY_MAX]
    long = [i for i, n in enumerate(q_lens) if n > SHORT_QUERY_MAX]
    groups = [_group(batch, short, q_lens)] if short else []
    groups += [_group(batch, [i], q_lens) for i in long]
    return groups


def _group(batch: ForwardBatch, seqs: list[int], q_lens: list[int]) -> AttentionGroup:
    device = batch.block_tables.device
    bs = batch.block_size
    idx = torch.tensor(seqs, device=device)
    lq = torch.tensor([q_lens[i] for i in seqs], device=device)
    ctx = torch.tensor([batch.context_lens[i] for i in seqs], device=device)
    start = torch.tensor([batch.query_start[i] for i in seqs], device=device)
    max_q = int(lq.max())
    n_blocks = -(-int(ctx.max()) // bs)

    qi = torch.arange(max_q, device=device)
    query_valid = qi[None, :] < lq[:, None]
    token_index = torch.where(query_valid, start[:, None] + qi[None, :], start[:, None])

    # Whole blocks are gathered (one contiguous copy each), not token rows.
    block_index = batch.block_tables[idx][:, :n_blocks]
    kpos = torch.arange(n_blocks * bs, device=device)
    qpos = ctx[:, None] - lq[:, None] + qi[None, :]  # [B, Lq]
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < ctx[:, None, None])
    return AttentionGroup(token_index, query_valid, block_index, mask[:, :, None, :])


class GatherBuffer:
    """Reused memory for gathered cache blocks: a fresh allocation of this size page-faults on
    every layer, which costs more than the gather itself on the CPU."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = rows * cols
        if self._buf is None or self._buf.numel() < n or self._buf.dtype != dtype or self._buf.device != device:
            self._buf = torch.empty(n, dtype=dtype, device=device)
        return self._buf[:n].view(rows, cols)


def paged_mla_attention_ref(
    q_latent: torch.Tensor,  # [T, H, kv_lora_rank]
    q_pe: torch.Tensor,  # [T, H, rope_dim]
    cache: torch.Tensor,  # [num_blocks, block_size, kv_lora_rank + rope_dim]
    groups: list[AttentionGroup],
    softmax_scale: float,
    buffer: GatherBuffer | None = None,
) -> torch.Tensor:
    kv_lora_rank = q_latent.shape[-1]
    heads = q_latent.shape[1]
    num_blocks, block_size, entry = cache.shape
    flat_blocks = cache.view(num_blocks, block_size * entry)
    buffer = buffer or GatherBuffer()
    q = torch.cat([q_latent, q_pe], dim=-1)  # [T, H, 576]
    out = torch.empty_like(q_latent)
    for g in groups:
        b, lq = g.token_index.shape
        qg = q[g.token_index].view(b, lq * heads, entry)
        blocks = g.block_index.flatten()
        kv = buffer.get(blocks.numel(), block_size * entry, cache.dtype, cache.device)
        torch.index_select(flat_blocks, 0, blocks, out=kv)
        kv = kv.view(b, -1, entry)  # [B, Lk, 576]
        scores = torch.bmm(qg, kv.transpose(1, 2)).float().view(b, lq, heads, -1) * softmax_scale
        scores.masked_fill_(~g.mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(kv.dtype).view(b, lq * heads, -1)
        # Multiplying by all 576 values and dropping the rope part after is cheaper than
        # multiplying by a strided 512-wide view, which bmm would first copy.
        og = torch.bmm(probs, kv).view(b, lq, heads, entry)[..., :kv_lora_rank]
        out[g.token_index[g.query_valid]] = og[g.query_valid]
    return out
