"""Basic layers: RMSNorm, a linear over a dequantized or an FP8 block-scaled weight, the dense MLP."""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from kernels.activation import silu_mul
from kernels.fp8_gemm import fp8_gemm
from kernels.linear import cpu_layout, linear
from kernels.quant import QUANT_GROUP, silu_mul_quant
from kernels.rms_norm import rms_norm, rms_norm_ref


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with `residual`, (norm(h), h) for h = x + residual (the add fused in)."""
        return rms_norm(x, self.weight, self.eps, residual)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps)


class Linear(nn.Module):
    """y = x Wᵀ with W [out, in]. With `scale_inv` the weight is the checkpoint's e4m3 and the
    product is an FP8 GEMM over activations quantized on the fly; without, W is already dequantized."""

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale_inv = None if scale_inv is None else nn.Parameter(scale_inv, requires_grad=False)

    @classmethod
    def load(cls, w: dict[str, torch.Tensor], name: str) -> Linear:
        return cls(w[name], w.get(name + "_scale_inv"))

    @cached_property
    def strips(self) -> torch.Tensor | None:
        """The weight in the compiled CPU linear's layout (kernels/linear.py), made on the first
        call that runs that kernel."""
        return cpu_layout(self.weight) if self.scale_inv is None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)


class StackedLinear(Linear):
    """The named linears (which share an input) as one product: `parts(x)` gives each one's output.
    An FP8 part is padded with zero rows to whole 128-row blocks (except the last), so that every
    part's rows keep their own scales; the padding's outputs are never handed out."""

    def __init__(self, w: dict[str, torch.Tensor], names: list[str]):
        fp8 = names[0] + "_scale_inv" in w
        weights, scales, spans = [], [], []
        start = 0
        for i, n in enumerate(names):
            weight, scale = w[n], w.get(n + "_scale_inv")
            rows = weight.shape[0]
            if fp8 and i < len(names) - 1:
                weight, scale = pad_fp8_rows(weight, scale, -(-rows // QUANT_GROUP) * QUANT_GROUP)
            weights.append(weight)
            scales.append(scale)
            spans.append((start, rows))
            start += weight.shape[0]
        super().__init__(torch.cat(weights), torch.cat(scales) if fp8 else None)
        self.spans = spans

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self(x)
        return [y[..., s : s + n] for s, n in self.spans]


def pad_fp8_rows(weight: torch.Tensor, scale_inv: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows up to `rows` (a multiple of 128): the scale grid already covers a partial block."""
    if weight.shape[0] == rows:
        return weight, scale_inv
    padded = weight.new_zeros(rows, weight.shape[1])
    padded[: weight.shape[0]] = weight
    return padded, scale_inv


def pad_fp8_cols(weight: torch.Tensor, scale_inv: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    if weight.shape[1] == cols:
        return weight, scale_inv
    padded = weight.new_zeros(weight.shape[0], cols)
    padded[:, : weight.shape[1]] = weight
    return padded, scale_inv


def fuse_gate_up_fp8(gate, gate_s, up, up_s, down, down_s):
    """gate|up stacked into one FP8 weight whose halves both start on a 128-row block, and down
    padded to match: padding rows are zero, so SiLU(0)·0 adds nothing."""
    inter = gate.shape[0]
    padded = -(-inter // QUANT_GROUP) * QUANT_GROUP
    gate, gate_s = pad_fp8_rows(gate, gate_s, padded)
    up, up_s = pad_fp8_rows(up, up_s, padded)
    down, down_s = pad_fp8_cols(down, down_s, padded)
    return torch.cat([gate, up]), torch.cat([gate_s, up_s]), down, down_s


class DenseMLP(nn.Module):
    """SwiGLU MLP with gate and up fused into one weight [2 * inter, hidden]."""

    def __init__(self, w: dict[str, torch.Tensor], prefix: str):
        super().__init__()
        gate, up, down = (prefix + n + ".weight" for n in ("gate_proj", "up_proj", "down_proj"))
        self.fp8 = gate + "_scale_inv" in w
        if self.fp8:
            gu, gu_s, dn, dn_s = fuse_gate_up_fp8(w[gate], w[gate + "_scale_inv"], w[up], w[up + "_scale_inv"],
                                                  w[down], w[down + "_scale_inv"])
            self.gate_up, self.down_proj = Linear(gu, gu_s), Linear(dn, dn_s)
        else:
            self.gate_up = Linear(torch.cat([w[gate], w[up]], dim=0))
            self.down_proj = Linear(w[down])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            shape = x.shape
            h = self.gate_up(x.reshape(-1, shape[-1]))
            q, s = silu_mul_quant(h)
            d = self.down_proj
            out = fp8_gemm(q, s, d.weight, d.scale_inv, x.dtype)
            return out.view(*shape[:-1], out.shape[-1])  # (not -1: a pass over no rows has none)
        return self.down_proj(silu_mul(self.gate_up(x)))
