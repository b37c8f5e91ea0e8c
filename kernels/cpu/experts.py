"""The routed experts (kernels/csrc/moe_cpu.cpp): choices sorted by expert, gathered, both products and the
weighted sum, on weights in the AMX tiles' strip layout (kernels/cpu/linear.py: pack_strips)."""

from __future__ import annotations

import torch

from kernels.cpu import I32, I64, P, declare, last_dim_contiguous, library, ptr, require_host

declare("moe_routed", x=P, x_row=I64, tokens=I64, ids=P, weights=P, k=I32, first_expert=I32, n_experts=I32, w1=P,
        w2=P, add=P, add_row=I64, choices=P, out=P, out_row=I64, hidden=I32, inter=I32, num_threads=I32)


def moe_experts_available(dtype: torch.dtype, hidden: int, inter: int) -> bool:
    """Whether `moe_routed` runs here: bf16, the moe family on a compiled variant, hidden a
    multiple of 64 and the expert width of 32 (DeepSeek-V3: 7168 and 2048)."""
    return dtype == torch.bfloat16 and hidden % 64 == 0 and inter % 32 == 0 and library("moe") is not None


EXPERT_STRIP = 64  # output columns per strip of moe_cpu.cpp's weight layout


def moe_routed(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, first_expert: int,
               gate_up_pairs: torch.Tensor, down_pairs: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, hidden] bf16 (any row stride); weights, ids [T, k] (global expert ids; those off this
    rank's experts [first_expert, first_expert + n) are skipped); gate_up_pairs =
    pack_strips([n, 2 inter, hidden], EXPERT_STRIP), down_pairs = pack_strips([n, hidden, inter],
    EXPERT_STRIP) -> [T, hidden]:
    per token, the sum over its on-rank choices of weight * (silu(x W_gate) * (x W_up)) W_down,
    plus `add` ([T, hidden] bf16) when given."""
    lib = library("moe")
    require_host("moe_routed", x, weights, ids, gate_up_pairs, down_pairs, *([add] if add is not None else []))
    n, strips, half_hidden, _, _ = gate_up_pairs.shape
    hidden, inter = half_hidden * 2, strips * EXPERT_STRIP // 2
    tokens, k = ids.shape
    if (x.dtype != torch.bfloat16 or x.shape != (tokens, hidden) or weights.shape != ids.shape
            or gate_up_pairs.shape[3:] != (EXPERT_STRIP, 2)
            or down_pairs.shape != (n, hidden // EXPERT_STRIP, inter // 2, EXPERT_STRIP, 2)
            or (add is not None and (add.dtype != torch.bfloat16 or add.shape != x.shape))):
        raise ValueError(f"moe_routed: x {tuple(x.shape)} {x.dtype}, weights {tuple(weights.shape)}, "
                         f"ids {tuple(ids.shape)}, gate_up {tuple(gate_up_pairs.shape)}, "
                         f"down {tuple(down_pairs.shape)} do not fit")
    x = last_dim_contiguous(x)
    if add is not None:
        add = last_dim_contiguous(add)
    ids = ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    out = torch.empty(tokens, hidden, dtype=torch.bfloat16)
    if tokens == 0:
        return out
    choices = torch.empty(tokens * k, hidden, dtype=torch.bfloat16)
    rc = lib.moe_routed(ptr(x), x.stride(0), tokens, ptr(ids), ptr(weights), k, first_expert, n,
                        ptr(gate_up_pairs), ptr(down_pairs), ptr(add) if add is not None else None,
                        add.stride(0) if add is not None else 0, ptr(choices), ptr(out), out.stride(0), hidden,
                        inter, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"moe_routed refused hidden={hidden} inter={inter} k={k}")
    return out
