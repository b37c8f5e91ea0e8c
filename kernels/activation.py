"""SwiGLU's activation, silu(gate) * up over h = [gate | up]: the compiled CPU kernel for bf16 on
a host that runs it (one pass, the torch path's two bf16 roundings), torch elsewhere. The FP8
MLP fuses the activation into its quantization instead (kernels/quant.py: silu_mul_quant)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import native


def silu_mul_ref(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    if native.runs("activation", h):
        return native.silu_mul(h)
    return silu_mul_ref(h)
