"""Paged MLA attention in the absorbed form, over the latent cache.

Queries arrive already mapped into latent space (q_latent = q_nope · W_UK per head) with their
rope part; every cache entry is [latent (kv_lora_rank) | rope key (qk_rope_head_dim)], shared by
all heads. score = q_latent·c + q_pe·k_pe; output = softmax · c (in latent space, [T, H, kv_lora_rank]).

`mla_attention` is what the model calls. Sequences with few query tokens (decode, speculative
verification) attend in the absorbed form: on CUDA (or with the kernels forced on) through the
Triton paged decode kernel; on the CPU through the compiled kernel of kernels/cpu/decode.py, which
reads the cache blocks where they lie. Where that cannot be built, the plain-torch path here pads
sequences that need the same number of cache blocks into one batched computation (so padding
stays under a block per sequence, instead of growing to the longest context of the step) and runs
torch's fused attention on it, the heads as query rows of one shared key/value head. The step's
longer prefill chunks, on either device, have their contexts' latents expanded to per-head keys
and values, many chunks in one gather and one product (for a chunk of many queries that costs
fewer flops than the absorbed form's 576-wide products), then causal attention: in bf16 on CPUs
with AMX through the compiled prefill kernel (every chunk of a group in one call), elsewhere
torch's fused scaled_dot_product_attention per chunk. The expansion costs (nope + v) x heads
values per context row (64 KB of bf16 in DeepSeek-V3) and 2 x rank flops per value. A step of many
chunks behind one long cached prefix (a shared system prompt) would expand that prefix once per
chunk, all at once: so chunks are grouped to expand at most `expand_limit` rows per group, and a
group whose contexts share cache rows expands each once, then copies one chunk's context at a
time out of them to attend over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import latent_fp8, native
from kernels.attention_plan import AttentionGroup, AttentionPlan, GatherBuffer, PrefillGroup
from kernels.backend import triton_wanted
from kernels.batch_invariant import dense_bmm, dense_linear
from kernels.mla_decode import paged_mla_decode

# Gathered cache blocks per slice of a decode group on the CPU (4 MiB: -11% attention time
# against one gather per group, 256 sequences x 4 blocks; 1 MiB and 256 KiB were slower).
GATHER_SLICE_BYTES = 4 << 20


def paged_mla_attention_ref(
    q_nope: torch.Tensor,  # [T, H, qk_nope_head_dim]
    q_pe: torch.Tensor,  # [T, H, rope_dim], rope applied
    cache: torch.Tensor,  # [num_blocks, block_size, kv_lora_rank + rope_dim]
    groups: list[AttentionGroup],
    w_uk: torch.Tensor,  # [H, nope, kv_lora_rank]
    w_uv: torch.Tensor,  # [H, v, kv_lora_rank]
    softmax_scale: float,
    out: torch.Tensor,  # [T, H, v]: the groups' tokens are written
    buffer: GatherBuffer | None = None,
) -> None:
    heads, _, kv_lora_rank = w_uk.shape
    block_size = cache.shape[1]
    entry = kv_lora_rank + q_pe.shape[-1]
    buffer = buffer or GatherBuffer()
    for g in groups:
        b, lq = g.token_index.shape
        tokens = g.token_index.flatten()
        q_latent = torch.einsum("thd,hdc->thc", q_nope[tokens], w_uk)
        q = torch.cat([q_latent, q_pe[tokens]], dim=-1).view(b, 1, lq * heads, entry)
        lk = g.block_index.shape[1] * block_size
        if lq == 1:  # every query row of a sequence (its heads) shares the sequence's mask
            mask = g.mask.view(b, 1, 1, lk)
        else:
            mask = g.mask.expand(b, lq, heads, lk).reshape(b, 1, lq * heads, lk)
        o = _attend_in_slices(q, mask, cache, g.block_index, kv_lora_rank, softmax_scale, buffer)
        o_latent = o.view(b, lq, heads, entry)[..., :kv_lora_rank]
        og = torch.einsum("blhc,hvc->blhv", o_latent, w_uv)
        out[g.token_index[g.query_valid]] = og[g.query_valid]



def _attend_in_slices(q: torch.Tensor, mask: torch.Tensor, cache: torch.Tensor, block_index: torch.Tensor,
                      kv_lora_rank: int, softmax_scale: float, buffer: GatherBuffer) -> torch.Tensor:
    """Absorbed attention of q [B, 1, rows, entry] over each sequence's gathered blocks
    (block_index [B, n_blocks]), one shared key/value head, in slices of sequences whose
    gathered blocks fit in the core caches (so the attention reads what the gather just wrote
    from cache, not from memory)."""
    num_blocks, block_size, row_width = cache.shape
    b, _, _, entry = q.shape
    n_blocks = block_index.shape[1]
    flat_blocks = cache.view(num_blocks, block_size * row_width)
    per_slice = max(1, GATHER_SLICE_BYTES // (n_blocks * flat_blocks.shape[1] * cache.element_size()))
    o = torch.empty_like(q)
    for s0 in range(0, b, per_slice):
        s1 = min(b, s0 + per_slice)
        blocks = block_index[s0:s1].flatten()
        kv = buffer.get(blocks.numel(), flat_blocks.shape[1], cache.dtype, cache.device)
        torch.index_select(flat_blocks, 0, blocks, out=kv)
        if latent_fp8.is_fp8(cache):
            kv = latent_fp8.dequantize_entries(kv.view(-1, row_width), kv_lora_rank, q.dtype)
        kv = kv.view(s1 - s0, 1, n_blocks * block_size, entry)
        # The values are the latents, the keys' first kv_lora_rank columns: passing the whole
        # 576-wide rows as values (and dropping the rope columns after) keeps the key and
        # value widths equal, which the fused CPU kernel requires.
        o[s0:s1] = F.scaled_dot_product_attention(q[s0:s1], kv, kv, attn_mask=mask[s0:s1], scale=softmax_scale)
    return o


def mla_prefill_expanded(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, plan: AttentionPlan,
                         w_uk: torch.Tensor, w_uv: torch.Tensor, softmax_scale: float, out: torch.Tensor) -> None:
    """Every prefill chunk of the step (the last `end - start` of its `context_len` positions)
    against its whole context, written into out[start:end]: group by group, the contexts' latents
    gathered and expanded to per-head K nope [L, H, nope] and V [L, H, v] for the group's chunks at
    once, then fused attention per chunk with a bottom-right causal mask. The CPU kernel takes
    queries and keys in their nope and rope parts; torch's attention gets them concatenated.
    MLASERVE_CPU_PREFILL=0 keeps the CPU on torch's attention."""
    q = None
    for group in plan.prefill_groups:
        q = _prefill_group_attention(q_nope, q_pe, cache, group, w_uk, w_uv, softmax_scale, out, q)


def _prefill_group_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, group: PrefillGroup,
                             w_uk: torch.Tensor, w_uv: torch.Tensor, softmax_scale: float, out: torch.Tensor,
                             q: torch.Tensor | None) -> torch.Tensor | None:
    """One group; returns the concatenated queries of torch's path (made once, for every group)."""
    heads, nope, rank = w_uk.shape
    v_dim = w_uv.shape[1]
    if latent_fp8.is_fp8(cache):
        latent = native.latent_fp8_gather(cache, group.slots, rank, q_nope.dtype)
    else:
        latent = cache.view(-1, cache.shape[-1]).index_select(0, group.slots)  # [L, 576], the group's contexts
    total = latent.shape[0]
    c, k_pe = latent.split([rank, latent.shape[-1] - rank], dim=-1)
    # One gather and two linears for the group's chunks together, not per chunk: per chunk, their
    # fixed costs were half of the CPU's prefill attention time. Plain linears over the [H * d, rank]
    # weights: an einsum would copy the weights into its batched layout on every call.
    k_nope = dense_linear(c, w_uk.view(heads * nope, rank)).view(total, heads, nope)
    v = dense_linear(c, w_uv.view(heads * v_dim, rank)).view(total, heads, v_dim)
    rope = k_pe.shape[-1]
    compiled = not latent.is_cuda and native.prefill_attention_available(q_nope.dtype, nope, rope, v_dim)
    if compiled and group.rows is None:
        # Queries and keys in their parts: the rope key is one row per token for every head.
        native.prefill_attention(q_nope, q_pe, k_nope, k_pe[:, None].expand(total, heads, rope), v,
                                 group.spans, softmax_scale, out)
        return q
    if not compiled and q is None:
        q = torch.cat([q_nope, q_pe], dim=-1)  # [T, H, nope + rope]
    first = 0
    for p in group.chunks:
        n = p.context_len
        if group.rows is None:
            kn, kp, vc = k_nope[first: first + n], k_pe[first: first + n], v[first: first + n]
        else:  # the shared rows were expanded once: this chunk's context, copied out of them
            kn, kp, vc = (t.index_select(0, group.rows[first: first + n]) for t in (k_nope, k_pe, v))
        first += n
        if compiled:
            span = torch.tensor([[p.start], [p.end - p.start], [0], [n]])
            native.prefill_attention(q_nope, q_pe, kn, kp[:, None].expand(n, heads, rope), vc, span, softmax_scale,
                                     out)
        else:
            out[p.start: p.end] = _torch_chunk_attention(q[p.start: p.end], kn, kp, vc, softmax_scale)
    return q


def _torch_chunk_attention(q: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
                           softmax_scale: float) -> torch.Tensor:
    """One chunk's queries [tq, H, nope + rope], the last tq of its n positions, over its context
    (k_nope [n, H, nope], k_pe [n, rope], v [n, H, v]) -> [tq, H, v]."""
    n, heads, v_dim = v.shape
    k = torch.cat([k_nope, k_pe[:, None].expand(n, heads, k_pe.shape[-1])], dim=-1)
    if not q.is_cuda:
        # torch's fused CPU kernel is 4x slower when values are narrower than keys: zero columns,
        # dropped after.
        v = F.pad(v, (0, k.shape[-1] - v_dim))
    qc, kc, vc = (t.transpose(0, 1)[None] for t in (q, k, v))
    tq = q.shape[0]
    if tq == n:  # no cached prefix: the plain causal mask
        o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=softmax_scale)
    else:
        # Bottom-right causal: query i sits at position n - tq + i. (torch's causal_lower_right
        # would do, but importing it loads torch._dynamo, a second of start-up.)
        mask = torch.ones(tq, n, dtype=torch.bool, device=q.device).tril(n - tq)
        o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=softmax_scale)
    return o[0, ..., :v_dim].transpose(0, 1)


def absorbed_cpu_layout(w_uk: torch.Tensor, w_uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The absorbed products' weights per head (w_uk [H, nope, rank] transposed, w_uv [H, v, rank])
    in the compiled linear's layout where it can take them (a second copy, ~2 x 0.5 MB a layer for
    the small model), else None."""
    uk_t = w_uk.transpose(1, 2)  # [H, rank, nope]: N = rank, K = nope
    if native.linear_available(uk_t[0]) and native.linear_available(w_uv[0]):
        return native.pack_strips(uk_t.contiguous()), native.pack_strips(w_uv)
    return None


def _absorbed_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, plan: AttentionPlan,
                     w_uk: torch.Tensor, w_uv: torch.Tensor, softmax_scale: float,
                     head_strips: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The decode rows' attention through the Triton kernel (CUDA) or the compiled one (CPU).
    The absorbed products stay [heads, rows, ...]; the CPU kernel takes them (and writes its
    output) with any row and head strides, which saves copying every query and output.
    `head_strips` (CPU, bf16: w_uk and w_uv per head in the compiled linear's layout, see
    absorbed_cpu_layout) puts both absorbed products on the compiled linear, [rows, heads, ...] in and out."""
    rows = plan.rows
    if (head_strips is not None and q_nope.shape[0] <= native.linear_max_rows() and not triton_wanted(q_nope)
            and native.runs("linear", q_nope)):
        q_latent = native.linear_heads(q_nope, head_strips[0])  # [T, H, rank]
        o_latent = torch.empty_like(q_latent)
        native.paged_mla_decode_cpu(q_latent, q_pe, cache, plan.block_tables, rows.seq_of_row, rows.kv_lens,
                                    softmax_scale, rows.max_kv_len, out=o_latent)
        return native.linear_heads(o_latent, head_strips[1])  # [T, H, v]
    # q_nope is a slice of the q_b_proj output: bmm over its strided transpose is 3x slower on the
    # CPU than a copy into [H, T, nope] and a bmm over that.
    q_latent = dense_bmm(q_nope.transpose(0, 1).contiguous(), w_uk).transpose(0, 1)  # [T, H, rank]
    if triton_wanted(q_nope):
        o_latent = paged_mla_decode(q_latent, q_pe, cache, plan.block_tables, rows.seq_of_row, rows.kv_lens,
                                    softmax_scale, rows.max_kv_len)
    else:
        o_latent = torch.empty_like(q_latent.transpose(0, 1)).transpose(0, 1)
        native.paged_mla_decode_cpu(q_latent, q_pe, cache, plan.block_tables, rows.seq_of_row, rows.kv_lens,
                                    softmax_scale, rows.max_kv_len, out=o_latent)
    return dense_bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [T, H, v]


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, plan: AttentionPlan,
                  w_uk: torch.Tensor, w_uv: torch.Tensor, softmax_scale: float,
                  head_strips: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q_nope [T, H, nope], q_pe [T, H, rope] (rope applied), this layer's cache (already holding
    the step's entries) -> attention output [T, H, v_head_dim], before o_proj. `head_strips`: see
    _absorbed_decode."""
    t, heads = q_nope.shape[:2]
    rows = plan.rows
    if rows is not None and rows.token_index is None:  # a pure decode step on the kernels: no gathers
        return _absorbed_decode(q_nope, q_pe, cache, plan, w_uk, w_uv, softmax_scale, head_strips)
    out = torch.empty(t, heads, w_uv.shape[1], dtype=q_nope.dtype, device=q_nope.device)
    if plan.groups:
        paged_mla_attention_ref(q_nope, q_pe, cache, plan.groups, w_uk, w_uv, softmax_scale, out, plan.buffer)
    if rows is not None:
        idx = rows.token_index
        out[idx] = _absorbed_decode(q_nope[idx], q_pe[idx], cache, plan, w_uk, w_uv, softmax_scale, head_strips)
    if plan.prefills:
        mla_prefill_expanded(q_nope, q_pe, cache, plan, w_uk, w_uv, softmax_scale, out)
    return out
