"""RMSNorm, with the residual add before it fused in: every decoder layer normalizes
h = x + residual twice (before attention, before the MLP), and MLA normalizes its query and
latent projections. One entry point, `rms_norm`: a Triton kernel where Triton runs (one program
per row), the compiled CPU pass for bf16 on the host, the torch reference elsewhere. In torch a
norm with its add is nine elementwise launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import native
from kernels.backend import triton_wanted
from kernels.quant import round_to_dtype_grid


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalize in float32 and scale after casting back, as the reference does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, x_stride, res_ptr, res_stride, sum_ptr, w_ptr, out_ptr, cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < cols
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_stride + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # h = x + residual in the activations' dtype, as torch adds them; h is returned too.
        residual = tl.load(res_ptr + row * res_stride + offs, mask=ok, other=0.0).to(tl.float32)
        x = round_to_dtype_grid(x + residual, dtype)
        tl.store(sum_ptr + row * cols + offs, x.to(dtype), mask=ok)
    # IEEE division and square root, as torch's.
    inv = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.sum(x * x, 0) / cols + eps))
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    out = round_to_dtype_grid(round_to_dtype_grid(x * inv, dtype) * w, dtype)
    tl.store(out_ptr + row * cols + offs, out.to(dtype), mask=ok)


def launch_config(cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of `cols`: the whole row in one block, 8 warps from 4K columns
    (DeepSeek-V3's hidden 7168 is 28 values a thread), 4 below."""
    block = triton.next_power_of_2(cols)
    return block, 8 if block >= 4096 else 4


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols) if x.stride(-1) == 1 else x.contiguous().view(-1, cols)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(out) if residual is not None else None
    r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, cols) if residual.stride(-1) == 1 else residual.contiguous().view(-1, cols)
    if x2.shape[0]:
        block, warps = launch_config(cols)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, x2.stride(0), r2 if r2 is not None else x2, r2.stride(0) if r2 is not None else 0,
            h if h is not None else out, weight, out, cols, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=warps)
    return out if h is None else (out, h)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * norm(x) over the last dim; with `residual`, of h = x + residual, returning
    (norm(h), h). Rows may be strided views."""
    same_dtype = weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype)
    if same_dtype and triton_wanted(x):
        return _rms_norm_triton(x, weight, eps, residual)
    if weight.dtype == torch.bfloat16 and native.rms_norm_available(x):
        return native.rms_norm(x, weight, eps, residual)
    if residual is None:
        return rms_norm_ref(x, weight, eps)
    h = x + residual
    return rms_norm_ref(h, weight, eps), h
