"""The MoE router in one pass: its linear and DeepSeek-V3's grouped expert selection
(kernels/csrc/moe_gate_cpu.cpp)."""

from __future__ import annotations

import torch

from kernels.cpu import F32, I32, I64, P, declare, last_dim_contiguous, library, ptr, require_host

declare("moe_gate", x=P, x_stride=I64, wt=P, bias=P, tokens=I64, hidden=I32, E=I32, n_group=I32, topk_group=I32, k=I32,
        normalize=I32, scaling=F32, weights=P, ids=P, num_threads=I32)


def moe_gate(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, k: int,
             normalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """model/moe.py's Gate through the compiled kernel: x [T, hidden] bf16 (any row stride), the
    gate's weight transposed, weight_t [hidden, E], and bias [E] float32 -> (weights [T, k] float32,
    ids [T, k] int64), best first."""
    lib = library("gate")
    require_host("moe_gate", x, weight_t, bias)
    tokens, hidden = x.shape
    experts = weight_t.shape[1]
    if (x.dtype != torch.bfloat16 or weight_t.dtype != torch.float32 or bias.dtype != torch.float32
            or weight_t.shape[0] != hidden or bias.shape != (experts,)):
        raise ValueError(f"moe_gate: x {tuple(x.shape)} {x.dtype}, weight_t {tuple(weight_t.shape)} "
                         f"{weight_t.dtype}, bias {tuple(bias.shape)} {bias.dtype} (want bf16 x, float32 "
                         "weight and bias)")
    x = last_dim_contiguous(x)
    weight_t, bias = weight_t.contiguous(), bias.contiguous()
    weights = torch.empty(tokens, k, dtype=torch.float32)
    ids = torch.empty(tokens, k, dtype=torch.int64)
    rc = lib.moe_gate(ptr(x), x.stride(0), ptr(weight_t), ptr(bias), tokens, hidden, experts, n_group, topk_group, k,
                      int(normalize), float(scaling), ptr(weights), ptr(ids), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"moe_gate refused {experts} experts in {n_group} groups, top {topk_group} groups, k={k}")
    return weights, ids
