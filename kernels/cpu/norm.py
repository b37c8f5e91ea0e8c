"""RMSNorm with its residual add, and the MLA cache write: norm, key and query rope and the store in one
pass (kernels/csrc/rms_norm_cpu.cpp, cache_write_cpu.cpp)."""

from __future__ import annotations

import torch

from kernels import latent_fp8
from kernels.cpu import F32, I32, I64, P, as_rows, declare, last_dim_contiguous, library, ptr, require_host, runs

declare("rms_norm_bf16", x=P, x_stride=I64, y=P, y_stride=I64, sum=P, sum_stride=I64, w=P, out=P, out_stride=I64,
        rows=I64, cols=I32, eps=F32, num_threads=I32)
declare("mla_cache_entries_bf16", c_kv=P, c_stride=I64, k_pe=P, k_stride=I64, q_pe=P, q_row=I64, q_head=I64, heads=I32,
        norm_w=P, eps=F32, rotations=P, num_positions=I64, positions=P, slots=P, cache=P, cache_rows=I64, rank=I32,
        rope=I32, tokens=I64, cache_fp8=I32, num_threads=I32)


def rms_norm_available(x: torch.Tensor) -> bool:
    """Whether `rms_norm` takes x: bf16 host rows with a contiguous last dim, the norm family on
    a compiled variant."""
    return x.dim() >= 1 and x.stride(-1) == 1 and runs("norm", x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """model/layers.py's RMSNorm of x (bf16, any row stride) through the compiled kernel. With
    `residual`, normalizes h = x + residual instead and returns (norm(h), h), the add fused in."""
    lib = library("norm")
    tensors = [x, weight] + ([residual] if residual is not None else [])
    require_host("rms_norm", *tensors)
    cols = x.shape[-1]
    if any(t.dtype != torch.bfloat16 for t in tensors) or weight.shape != (cols,) or (
            residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}"
                         + (f", residual {tuple(residual.shape)} {residual.dtype}" if residual is not None else "")
                         + ": wants bf16 rows and a weight as wide")
    x2, x_stride = as_rows(last_dim_contiguous(x))
    out = torch.empty(x.shape, dtype=x.dtype)
    weight = weight.contiguous()
    if residual is None:
        y2, y_stride, h = None, 0, None
    else:
        y2, y_stride = as_rows(last_dim_contiguous(residual))
        h = torch.empty(x.shape, dtype=x.dtype)
    rc = lib.rms_norm_bf16(ptr(x2), x_stride, ptr(y2) if y2 is not None else None, y_stride,
                           ptr(h) if h is not None else None, cols, ptr(weight), ptr(out), cols,
                           x2.shape[0], cols, float(eps), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"rms_norm refused rows of {cols}")
    return out if h is None else (out, h)


def mla_cache_entries(c_kv: torch.Tensor, k_pe: torch.Tensor, q_pe: torch.Tensor, norm_weight: torch.Tensor,
                      eps: float, rotations: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                      cache: torch.Tensor) -> None:
    """model/mla.py's cache write and rope in one compiled pass (bf16 on the host): writes
    [rms_norm(c_kv) | rope(k_pe)] into the cache rows `slots` ([num_blocks, block_size, entry] cache,
    bf16, or uint8 in the FP8 layout, quantized as latent_fp8.quantize_entries does) and rotates
    q_pe [T, H, rope] in place. rotations: the RotaryEmbedding's complex64 table."""
    lib = library("norm")
    require_host("mla_cache_entries", c_kv, k_pe, q_pe, norm_weight, rotations, positions, slots, cache)
    tokens, rank = c_kv.shape
    rope = k_pe.shape[-1]
    fp8 = latent_fp8.is_fp8(cache)
    width = latent_fp8.entry_bytes(rank, rope) if fp8 else rank + rope
    if (any(t.dtype != torch.bfloat16 for t in (c_kv, k_pe, q_pe, norm_weight))
            or not (fp8 or cache.dtype == torch.bfloat16)
            or rotations.dtype != torch.complex64 or rotations.shape[-1] * 2 != rope
            or cache.shape[-1] != width or q_pe.shape[0] != tokens or q_pe.shape[-1] != rope
            or k_pe.shape[0] != tokens or norm_weight.shape != (rank,) or not cache.is_contiguous()
            or any(t.stride(-1) != 1 for t in (c_kv, k_pe, q_pe))):
        raise ValueError(f"mla_cache_entries: c_kv {tuple(c_kv.shape)}, k_pe {tuple(k_pe.shape)}, "
                         f"q_pe {tuple(q_pe.shape)}, cache {tuple(cache.shape)} {cache.dtype} do not fit")
    positions = positions.to(torch.int64).contiguous()
    slots = slots.to(torch.int64).contiguous()
    rotations = rotations.contiguous()
    rc = lib.mla_cache_entries_bf16(ptr(c_kv), c_kv.stride(0), ptr(k_pe), k_pe.stride(0), ptr(q_pe),
                                    q_pe.stride(0), q_pe.stride(1), q_pe.shape[1], ptr(norm_weight.contiguous()),
                                    float(eps), ptr(rotations), rotations.shape[0], ptr(positions), ptr(slots),
                                    ptr(cache), cache.numel() // cache.shape[-1], rank, rope, tokens, int(fp8),
                                    torch.get_num_threads())
    if rc == -2:
        raise ValueError("mla_cache_entries: a position past the rope table or a slot past the cache")
    if rc != 0:
        raise RuntimeError(f"mla_cache_entries refused rank={rank} rope={rope}")
