"""The dense linear, y = x Wᵀ, one entry point over its three implementations:

- FP8 block-scaled weights (the checkpoint's e4m3 with scale_inv): kernels/fp8_gemm.py over
  activations quantized on the fly;
- bf16 weights on a host whose CPU runs the compiled linear (AMX or AVX-512), up to its row
  limit: the weight in the kernel's strip layout, packed once on first use (kernels/cpu/linear.py);
- otherwise torch's matmul (kernels/batch_invariant.py: a fixed-tile product in that mode).

The layer (model/layers.py: Linear) holds `weight`, `scale_inv` and a lazily made `strips`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kernels import native
from kernels.batch_invariant import dense_linear
from kernels.fp8_gemm import fp8_linear


class LinearWeights(Protocol):
    weight: torch.Tensor
    scale_inv: torch.Tensor | None

    @property
    def strips(self) -> torch.Tensor | None: ...


def cpu_layout(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in the compiled CPU linear's layout where that kernel can take it (a second copy
    of the weight, so made only where the host runs the model), else None. A weight whose rows are
    not whole strips (a vocabulary's head) gets zero rows to the next strip, which `linear` cuts
    off its output: torch's bf16 matmul took 2-3x the kernel's time on the demo model's head."""
    if weight.dim() == 2 and weight.shape[0] % native.LINEAR_STRIP:
        padded = weight.new_zeros(-(-weight.shape[0] // native.LINEAR_STRIP) * native.LINEAR_STRIP, weight.shape[1])
        padded[: weight.shape[0]] = weight
        weight = padded
    return native.pack_strips(weight) if native.linear_available(weight) else None


def linear(x: torch.Tensor, w: LinearWeights) -> torch.Tensor:
    if w.scale_inv is not None:
        return fp8_linear(x, w.weight, w.scale_inv)
    # (the cheap tests first: this runs for every linear of a step)
    if (w.strips is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.numel() <= native.linear_max_rows() * x.shape[-1]):
        y = native.linear(x, w.strips)
        return y if y.shape[-1] == w.weight.shape[0] else y[..., : w.weight.shape[0]]
    return dense_linear(x, w.weight)
