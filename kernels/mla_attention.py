"""Paged MLA attention in the absorbed form, over the latent cache.

Queries arrive already mapped into latent space (q_latent = q_nope · W_UK per head) with their
rope part; every cache entry is [latent (kv_lora_rank) | rope key (qk_rope_head_dim)], shared by
all heads. score = q_latent·c + q_pe·k_pe; output = softmax · c (in latent space, [T, H, kv_lora_rank]).

`mla_attention` is what the model calls. On the CPU it runs the plain-torch reference here:
sequences with few query tokens (decode, speculative verification) are padded into one batched
computation; each longer prefill chunk is computed on its own, so padding never grows with the
longest chunk times the batch. On CUDA (or with the kernels forced on) the short-query rows go to
the Triton paged decode kernel, and each long prefill chunk expands its context's latents to
per-head keys and values and runs torch's fused scaled_dot_product_attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kernels.backend import triton_wanted
from kernels.mla_decode import paged_mla_decode
from model.forward_batch import ForwardBatch

# Sequences with at most this many query tokens share one padded computation.
SHORT_QUERY_MAX = 8


@dataclass
class AttentionGroup:
    token_index: torch.Tensor  # [B, Lq] flat token ids (padding points at a valid token)
    query_valid: torch.Tensor  # [B, Lq] bool
    block_index: torch.Tensor  # [B, n_blocks] physical blocks (padding points at block 0)
    mask: torch.Tensor  # [B, Lq, 1, n_blocks * block_size] True where the query may attend


@dataclass
class DecodeRows:
    """The kernel path's short-query tokens: one row per token, with its own causal length."""
    token_index: torch.Tensor | None  # [R] flat token ids; None when every token is a row
    seq_of_row: torch.Tensor  # [R] row of batch.block_tables
    kv_lens: torch.Tensor  # [R]
    max_kv_len: int


@dataclass
class PrefillChunk:
    start: int  # flat token range [start, end)
    end: int
    seq: int
    context_len: int


@dataclass
class AttentionPlan:
    """Built once per step and shared by every layer."""
    block_tables: torch.Tensor
    use_kernels: bool
    groups: list[AttentionGroup]  # reference path
    rows: DecodeRows | None  # kernel path
    prefills: list[PrefillChunk]  # kernel path
    buffer: GatherBuffer | None = None


def plan_attention(batch: ForwardBatch, like: torch.Tensor, buffer: GatherBuffer | None = None) -> AttentionPlan:
    """`like` is any tensor on the model's device: it picks the kernels or the reference."""
    q_lens = [batch.query_start[i + 1] - batch.query_start[i] for i in range(batch.num_seqs)]
    short = [i for i, n in enumerate(q_lens) if n <= SHORT_QUERY_MAX]
    long = [i for i, n in enumerate(q_lens) if n > SHORT_QUERY_MAX]
    if not triton_wanted(like):
        groups = [_group(batch, short, q_lens)] if short else []
        groups += [_group(batch, [i], q_lens) for i in long]
        return AttentionPlan(batch.block_tables, False, groups, None, [], buffer)
    rows = _decode_rows(batch, short, q_lens) if short else None
    prefills = [PrefillChunk(batch.query_start[i], batch.query_start[i + 1], i, batch.context_lens[i]) for i in long]
    return AttentionPlan(batch.block_tables, True, [], rows, prefills, buffer)


def _decode_rows(batch: ForwardBatch, seqs: list[int], q_lens: list[int]) -> DecodeRows:
    device = batch.block_tables.device
    tokens, seq_of_row, kv_lens = [], [], []
    for i in seqs:
        start, ctx, n = batch.query_start[i], batch.context_lens[i], q_lens[i]
        tokens.extend(range(start, start + n))
        seq_of_row.extend([i] * n)
        kv_lens.extend(range(ctx - n + 1, ctx + 1))
    every_token = len(tokens) == batch.query_start[-1]
    index = None if every_token else torch.tensor(tokens, device=device)
    return DecodeRows(index, torch.tensor(seq_of_row, device=device, dtype=torch.int32),
                      torch.tensor(kv_lens, device=device, dtype=torch.int32), max(kv_lens))


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

    def release(self) -> None:
        self._buf = None


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


def mla_prefill_expanded(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                         context_len: int, w_uk: torch.Tensor, w_uv: torch.Tensor,
                         softmax_scale: float) -> torch.Tensor:
    """One prefill chunk (the last len(q) of `context_len` positions) against its whole context:
    latents expanded to per-head K [L, H, nope + rope] and V [L, H, v], then fused attention with
    a bottom-right causal mask. Returns [Tq, H, v]."""
    page = cache.shape[1]
    rank = w_uk.shape[-1]
    pages = -(-context_len // page)
    latent = cache[block_table[:pages]].view(pages * page, -1)[:context_len]  # [L, 576]
    c, k_pe = latent.split([rank, latent.shape[-1] - rank], dim=-1)
    heads = w_uk.shape[0]
    k_nope = torch.einsum("lc,hdc->hld", c, w_uk)  # [H, L, nope]
    k = torch.cat([k_nope, k_pe[None].expand(heads, -1, -1)], dim=-1)
    v = torch.einsum("lc,hvc->hlv", c, w_uv)  # [H, L, v]
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [H, Tq, nope + rope]
    mask = causal_lower_right(q.shape[1], context_len)
    o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=softmax_scale)
    return o[0].transpose(0, 1)


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, plan: AttentionPlan,
                  w_uk: torch.Tensor, w_uv: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """q_nope [T, H, nope], q_pe [T, H, rope] (rope applied), this layer's cache (already holding
    the step's entries) -> attention output [T, H, v_head_dim], before o_proj."""
    if not plan.use_kernels:
        q_latent = torch.einsum("thd,hdc->thc", q_nope, w_uk)
        o_latent = paged_mla_attention_ref(q_latent, q_pe, cache, plan.groups, softmax_scale, plan.buffer)
        return torch.einsum("thc,hvc->thv", o_latent.to(q_nope.dtype), w_uv)
    t, heads = q_nope.shape[:2]
    rows = plan.rows
    if rows is not None and rows.token_index is None:  # a pure decode step: no gathers
        q_latent = torch.einsum("thd,hdc->thc", q_nope, w_uk)
        o_latent = paged_mla_decode(q_latent, q_pe, cache, plan.block_tables, rows.seq_of_row, rows.kv_lens,
                                    softmax_scale, rows.max_kv_len)
        return torch.einsum("thc,hvc->thv", o_latent, w_uv)
    out = torch.empty(t, heads, w_uv.shape[1], dtype=q_nope.dtype, device=q_nope.device)
    if rows is not None:
        idx = rows.token_index
        q_latent = torch.einsum("thd,hdc->thc", q_nope[idx], w_uk)
        o_latent = paged_mla_decode(q_latent, q_pe[idx], cache, plan.block_tables, rows.seq_of_row, rows.kv_lens,
                                    softmax_scale, rows.max_kv_len)
        out[idx] = torch.einsum("thc,hvc->thv", o_latent, w_uv)
    for p in plan.prefills:
        out[p.start: p.end] = mla_prefill_expanded(q_nope[p.start: p.end], q_pe[p.start: p.end], cache,
                                                   plan.block_tables[p.seq], p.context_len, w_uk, w_uv,
                                                   softmax_scale)
    return out
