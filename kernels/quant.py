"""Dynamic activation quantization to FP8 e4m3, per token per 128 channels (float32 scales), as
the published DeepSeek-V3 inference code does before every FP8 GEMM.

    scale[m, b] = max(|x[m, 128b : 128b + 128]|) / 448,   q = x / scale (e4m3)

`silu_mul_quant` fuses the MoE's SiLU(gate) * up with the quantization of its result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import cdiv, triton_wanted

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
QUANT_GROUP = 128
# A block of zeros gets this scale instead of 0, so dequantizing never divides by zero.
MIN_AMAX = 1e-10


def act_quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    groups = cdiv(k, QUANT_GROUP)
    padded = x.float().new_zeros(m, groups * QUANT_GROUP)
    padded[:, :k] = x.float()
    blocks = padded.view(m, groups, QUANT_GROUP)
    scale = blocks.abs().amax(-1).clamp(min=MIN_AMAX) / FP8_MAX
    q = (blocks / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(m, -1)[:, :k].contiguous()
    return q, scale


def silu_mul_quant_ref(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return act_quant_ref((torch.nn.functional.silu(gate) * up).to(gate_up.dtype))


@triton.jit
def round_to_bf16_grid(v):
    """float32 v rounded to the nearest bf16 value (ties to even), kept in float32: a cast of the
    result to bf16 is then exact, where the interpreter's own cast truncates."""
    u = v.to(tl.uint32, bitcast=True)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def round_to_dtype_grid(v, dtype: tl.constexpr):
    """float32 v rounded to `dtype`'s values, kept in float32 (bf16 through round_to_bf16_grid)."""
    if dtype == tl.bfloat16:
        return round_to_bf16_grid(v)
    return v.to(dtype).to(tl.float32)


@triton.jit
def round_to_e4m3_grid(v):
    """Round-to-nearest-even onto e4m3's values, in float32 arithmetic: adding and removing
    1.5·2^23 rounds v/step to an integer in the FPU's own round-to-nearest-even mode."""
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step_exponent = tl.maximum(exponent, -6) - 3  # 3 mantissa bits; subnormals below 2^-6
    step = ((step_exponent + 127) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0
    return ((v / step + magic) - magic) * step


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, K, x_row_stride, up_offset,
                  SILU_MUL: tl.constexpr, GROUP: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr,
                  ROUND_IN_SOFTWARE: tl.constexpr):
    row = tl.program_id(0)
    groups = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    ok = cols < K
    x_row = x_ptr + row.to(tl.int64) * x_row_stride
    x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    if SILU_MUL:
        up = tl.load(x_row + up_offset + cols, mask=ok, other=0.0).to(tl.float32)
        # Rounded to the activation dtype first, as the unfused torch code computes it.
        x = (tl.math.div_rn(x, 1.0 + tl.exp(-x)) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), 1), 1e-10), 448.0)
    # IEEE division (not the fast approximate one) so the rounding matches the torch reference.
    q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -448.0, 448.0)
    if ROUND_IN_SOFTWARE:
        # Rounded onto the e4m3 grid first, so the cast below only converts exact values: the
        # interpreter's cast drops carries, and a cast that goes through fp16 rounds twice.
        q = round_to_e4m3_grid(q)
    tl.store(q_ptr + row.to(tl.int64) * K + cols, q.to(q_ptr.dtype.element_ty), mask=ok)
    n_groups = tl.cdiv(K, GROUP)
    tl.store(s_ptr + row.to(tl.int64) * n_groups + groups, scale, mask=groups < n_groups)


GROUPS_PER_PROGRAM = 8


def _launch(x: torch.Tensor, k: int, silu_mul: bool) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.shape[0]
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    s = torch.empty(m, cdiv(k, QUANT_GROUP), dtype=torch.float32, device=x.device)
    if m:
        grid = (m, cdiv(s.shape[1], GROUPS_PER_PROGRAM))
        _quant_kernel[grid](x, q, s, k, x.stride(0), k, SILU_MUL=silu_mul, GROUP=QUANT_GROUP,
                            GROUPS_PER_PROGRAM=GROUPS_PER_PROGRAM, ROUND_IN_SOFTWARE=True,
                            num_warps=4)
    return q, s


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, ceil(K / 128)])."""
    if not triton_wanted(x):
        return act_quant_ref(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    return _launch(x, x.shape[1], silu_mul=False)


def silu_mul_quant(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [M, 2I] (gate then up) -> quantized SiLU(gate) * up, [M, I] and its scales."""
    if not triton_wanted(gate_up):
        return silu_mul_quant_ref(gate_up)
    gate_up = gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous()
    return _launch(gate_up, gate_up.shape[1] // 2, silu_mul=True)
