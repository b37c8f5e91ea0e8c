"""Causal attention of prefill chunks, all in one call (kernels/csrc/prefill_attention_cpu.cpp)."""

from __future__ import annotations

import torch

from kernels.cpu import F32, I32, I64, P, declare, last_dim_contiguous, library, ptr, require_host

declare("prefill_attention", q_nope=P, qn_row=I64, qn_head=I64, q_pe=P, qp_row=I64, qp_head=I64, k_nope=P, kn_row=I64,
        kn_head=I64, k_pe=P, kp_row=I64, kp_head=I64, v=P, v_row=I64, v_head=I64, out=P, o_row=I64, o_head=I64,
        q_start=P, q_len=P, k_start=P, k_len=P, chunks=I32, heads=I32, Dn=I32, D=I32, Dv=I32, scale=F32,
        num_threads=I32)


def prefill_attention_available(dtype: torch.dtype, nope_dim: int, rope_dim: int, v_dim: int) -> bool:
    """Whether `prefill_attention` runs here: bf16, the prefill family on a compiled variant, the
    key parts' widths multiples of 32 and the values' of 64 (DeepSeek-V3: 128 + 64 and 128).
    MLASERVE_CPU_PREFILL=off turns it off (torch's fused attention instead)."""
    return (dtype == torch.bfloat16 and nope_dim % 32 == 0 and rope_dim % 32 == 0 and v_dim % 64 == 0
            and library("prefill") is not None)


def prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                      v: torch.Tensor, spans: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """Causal attention of prefill chunks, all of them in one call, with queries [q_nope | q_pe]
    and keys [k_nope | k_pe] given in their two parts: q_nope [T, H, Dn], q_pe [T, H, R],
    k_nope [L, H, Dn], k_pe [L, H, R] (an expanded view, head stride 0, shares a row among the
    heads), v [L, H, Dv], out [T, H, Dv] (written for the chunks' queries), bf16, any row and head
    strides; spans [4, chunks] int64: query start, query count, key start, key count (>= the query
    count); query i of a chunk sits at position key count - query count + i and sees the keys up to it."""
    lib = library("prefill")
    require_host("prefill_attention", q_nope, q_pe, k_nope, k_pe, v, spans, out)
    tokens, heads, dn = q_nope.shape
    rope, length, dv = q_pe.shape[2], k_nope.shape[0], v.shape[2]
    if (any(t.dtype != torch.bfloat16 for t in (q_nope, q_pe, k_nope, k_pe, v, out))
            or q_pe.shape[:2] != (tokens, heads) or k_nope.shape != (length, heads, dn)
            or k_pe.shape != (length, heads, rope) or v.shape[:2] != (length, heads)
            or out.shape != (tokens, heads, dv) or spans.shape[0] != 4):
        raise ValueError(f"prefill_attention: q {tuple(q_nope.shape)} + {tuple(q_pe.shape)}, k {tuple(k_nope.shape)} "
                         f"+ {tuple(k_pe.shape)}, v {tuple(v.shape)}, out {tuple(out.shape)} (want bf16 [T, H, Dn] + "
                         "[T, H, R], [L, H, Dn] + [L, H, R], [L, H, Dv], [T, H, Dv])")
    q_nope, q_pe, k_nope, k_pe, v = map(last_dim_contiguous, (q_nope, q_pe, k_nope, k_pe, v))
    if out.stride(-1) != 1:
        raise ValueError("prefill_attention: out needs a contiguous last dim")
    spans = spans.to(torch.int64).contiguous()
    q_start, q_len, k_start, k_len = spans
    if spans.shape[1] and (int((q_start + q_len).max()) > tokens or int((k_start + k_len).max()) > length):
        raise ValueError("prefill_attention: a span reaches past its tensor")
    rc = lib.prefill_attention(ptr(q_nope), q_nope.stride(0), q_nope.stride(1), ptr(q_pe), q_pe.stride(0),
                               q_pe.stride(1), ptr(k_nope), k_nope.stride(0), k_nope.stride(1), ptr(k_pe),
                               k_pe.stride(0), k_pe.stride(1), ptr(v), v.stride(0), v.stride(1), ptr(out),
                               out.stride(0), out.stride(1), ptr(q_start), ptr(q_len), ptr(k_start), ptr(k_len),
                               spans.shape[1], heads, dn, dn + rope, dv, float(scale), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"prefill_attention refused heads={heads} Dn={dn} D={dn + rope} Dv={dv} (or a span with "
                           "fewer keys than queries)")
