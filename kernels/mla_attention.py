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
    kv_slots: torch.Tensor  # [B, Lk] cache slots (padding points at slot 0)
    mask: torch.Tensor  # [B, 1, Lq, Lk] True where the query may attend


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
    idx = torch.tensor(seqs, device=device)
    lq = torch.tensor([q_lens[i] for i in seqs], device=device)
    ctx = torch.tensor([batch.context_lens[i] for i in seqs], device=device)
    start = torch.tensor([batch.query_start[i] for i in seqs], device=device)
    max_q, max_k = int(lq.max()), int(ctx.max())

    qi = torch.arange(max_q, device=device)
    query_valid = qi[None, :] < lq[:, None]
    token_index = torch.where(query_valid, start[:, None] + qi[None, :], start[:, None])

    kpos = torch.arange(max_k, device=device)
    bs = batch.block_size
    blocks = batch.block_tables[idx][:, (kpos // bs).clamp(max=batch.block_tables.shape[1] - 1)]
    key_valid = kpos[None, :] < ctx[:, None]
    kv_slots = torch.where(key_valid, blocks * bs + kpos % bs, torch.zeros_like(blocks))

    qpos = ctx[:, None] - lq[:, None] + qi[None, :]  # [B, Lq]
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & key_valid[:, None, :]
    return AttentionGroup(token_index, query_valid, kv_slots, mask[:, None])


def paged_mla_attention_ref(
    q_latent: torch.Tensor,  # [T, H, kv_lora_rank]
    q_pe: torch.Tensor,  # [T, H, rope_dim]
    cache: torch.Tensor,  # [num_slots, kv_lora_rank + rope_dim]
    groups: list[AttentionGroup],
    softmax_scale: float,
) -> torch.Tensor:
    kv_lora_rank = q_latent.shape[-1]
    q = torch.cat([q_latent, q_pe], dim=-1)  # [T, H, 576]
    out = torch.empty_like(q_latent)
    for g in groups:
        qg = q[g.token_index]  # [B, Lq, H, 576]
        kv = cache[g.kv_slots]  # [B, Lk, 576]
        scores = torch.einsum("bqhc,bkc->bhqk", qg, kv).float() * softmax_scale
        scores.masked_fill_(~g.mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(kv.dtype)
        og = torch.einsum("bhqk,bkc->bqhc", probs, kv[..., :kv_lora_rank])
        out[g.token_index[g.query_valid]] = og[g.query_valid]
    return out
