"""SwiGLU's activation, silu(gate) * up, in one pass with the torch path's two bf16 roundings
(kernels/csrc/activation_cpu.cpp)."""

from __future__ import annotations

import torch

from kernels.cpu import I32, I64, P, as_rows, declare, last_dim_contiguous, library, ptr, require_host

declare("silu_mul_bf16", h=P, h_stride=I64, out=P, out_stride=I64, rows=I64, cols=I32, num_threads=I32)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for h = [gate | up] ([..., 2 * cols], bf16 on the host, any row stride)
    through the compiled kernel, with the reference's two bf16 roundings -> [..., cols]."""
    lib = library("activation")
    require_host("silu_mul", h)
    cols = h.shape[-1] // 2
    if h.dtype != torch.bfloat16 or h.shape[-1] != 2 * cols or cols == 0:
        raise ValueError(f"silu_mul: h {tuple(h.shape)} {h.dtype} (want bf16 [..., 2 * cols])")
    h2, stride = as_rows(last_dim_contiguous(h))
    out = torch.empty(*h.shape[:-1], cols, dtype=h.dtype)
    rc = lib.silu_mul_bf16(ptr(h2), stride, ptr(out), cols, h2.shape[0], cols, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"silu_mul refused rows of {cols}")
    return out
