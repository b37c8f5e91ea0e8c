"""W8A8 block-scaled FP8 GEMM: C = (A · a_scale) (B · b_scale)ᵀ, bf16 out.

A [M, K] e4m3 with float32 scales per row per 128 columns (from `act_quant`); B [N, K] e4m3, the
checkpoint's weight, with `weight_scale_inv` [ceil(N/128), ceil(K/128)]. The K loop steps 128 at a
time, so each step's partial product is scaled by one A scale per row and one B scale per column
before it is accumulated in float32. M, N and K need not be multiples of the tiles.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.backend import batch_invariant, cdiv, triton_wanted
from kernels.quant import QUANT_GROUP, act_quant


def fp8_gemm_ref(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    a_deq = a.float() * a_scale.repeat_interleave(QUANT_GROUP, dim=1)[:, :k]
    b_deq = b.float() * b_scale.repeat_interleave(QUANT_GROUP, 0).repeat_interleave(QUANT_GROUP, 1)[:n, :k]
    return (a_deq @ b_deq.T).to(out_dtype)


# M changes every step: specializing on it (M % 16, M == 1) would compile a variant per kind of step.
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, M_BUCKET,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    BLOCK_K: tl.constexpr = 128
    pid = tl.program_id(0)
    # Programs that share B columns run close together, so B tiles are reused from L2.
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Edge tiles read wrapped-around rows instead of masking them, so the loads stay unmasked
    # and wide; the store below drops those rows.
    rows_a = offs_m % M
    rows_b = offs_n % N
    k_groups = tl.cdiv(K, BLOCK_K)
    a_ptrs = a_ptr + rows_a[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = b_ptr + rows_b[None, :].to(tl.int64) * K + offs_k[:, None]
    as_ptrs = as_ptr + rows_a * k_groups
    # A tile no wider than a weight block lies inside one block column: its weight scale is one
    # number per K step, and the rescale is a single multiply-add per accumulator element (+10-17%
    # on the H100 against a per-column scale vector).
    ONE_B_SCALE: tl.constexpr = BLOCK_N <= BLOCK_K
    if ONE_B_SCALE:
        bs_ptrs = bs_ptr + (pid_n * BLOCK_N // BLOCK_K) * k_groups
    else:
        bs_ptrs = bs_ptr + (rows_b // BLOCK_K) * k_groups
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_groups):
        if EVEN_K:
            a = tl.load(a_ptrs + kb * BLOCK_K)
            b = tl.load(b_ptrs + kb * BLOCK_K)
        else:
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs + kb * BLOCK_K, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs + kb * BLOCK_K, mask=k_ok[:, None], other=0.0)
        a_s = tl.load(as_ptrs + kb)
        b_s = tl.load(bs_ptrs + kb)
        if ONE_B_SCALE:
            acc += tl.dot(a, b) * (a_s * b_s)[:, None]
        else:
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemm_tile(m: int, n: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for an M x N output, from the autotuner's winners
    on DeepSeek-V3's linears on an H100 (benchmarks/kernels.py --autotune): 16 x 64 while M is a
    few rows (the weight read dominates); 64 x 128 up to ~1K rows (64 x 64 where that leaves half
    the multiprocessors idle, 128 x 128 where even those tiles make six waves); 128 x 128 with 8
    warps beyond. Chosen, not autotuned: the engine meets a new M every few steps, and tuning times
    all 15 candidates on each, which inside a serving step cost far more than it saved."""
    if m <= 16:
        return 16, 64, 4, 4
    if m <= 64:
        return 64, 64, 4, 4
    big_tiles = cdiv(m, 128) * cdiv(n, 128)
    if m > 1024:
        return (128, 128, 8, 4) if big_tiles >= sms else (64, 128, 4, 4)
    if big_tiles >= 6 * sms:
        return 128, 128, 8, 4
    if cdiv(m, 64) * cdiv(n, 128) < sms // 2:
        return 64, 64, 4, 4
    return 64, 128, 4, 4


_TUNING_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (16, 64, 4, 4), (32, 64, 4, 4), (32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 4, 4), (64, 128, 4, 5),
        (64, 128, 8, 3), (128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4), (128, 256, 8, 3), (128, 256, 8, 4),
        (64, 256, 8, 3), (64, 256, 4, 4), (256, 128, 8, 3),
    ]
]
# For the kernel benchmark only: how far the chosen tile is from the best of the candidates.
fp8_gemm_autotuned = triton.autotune(configs=_TUNING_CONFIGS, key=["N", "K", "M_BUCKET"])(_fp8_gemm_kernel)


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, autotune: bool = False) -> torch.Tensor:
    """On CUDA the tile is `gemm_tile`'s; `autotune` times all candidates on first use of each
    shape bucket instead (benchmarks)."""
    if not triton_wanted(a):
        return fp8_gemm_ref(a, a_scale, b, b_scale, out_dtype)
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k or a_scale.shape != (m, cdiv(k, QUANT_GROUP)) or b_scale.shape != (
            cdiv(n, QUANT_GROUP), cdiv(k, QUANT_GROUP)):
        raise ValueError(f"fp8_gemm shapes do not fit: a {list(a.shape)} a_scale {list(a_scale.shape)} "
                         f"b {list(b.shape)} b_scale {list(b_scale.shape)}")
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return c
    a, b = a.contiguous(), b.contiguous()
    even_k = k % 128 == 0
    if a.is_cuda and autotune:
        def grid(meta):
            return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)
        fp8_gemm_autotuned[grid](a, a_scale, b, b_scale, c, m, n, k, _m_bucket(m), EVEN_K=even_k)
        return c
    if a.is_cuda:
        # The batch-invariant mode keeps one tile whatever M (kernels/batch_invariant.py).
        bm, bn, warps, stages = (64, 128, 4, 4) if batch_invariant() else gemm_tile(m, n, _num_sms(a.device))
    else:  # the interpreter: one tile (each program costs milliseconds there)
        bm, bn, warps, stages = 32, 128, 4, 1
    _fp8_gemm_kernel[(cdiv(m, bm) * cdiv(n, bn),)](a, a_scale, b, b_scale, c, m, n, k, 0, BLOCK_M=bm, BLOCK_N=bn,
                                                  GROUP_M=8 if a.is_cuda else 4, EVEN_K=even_k,
                                                  num_warps=warps, num_stages=stages)
    return c


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ for an FP8 block-scaled weight, activations quantized on the fly; y in x's dtype."""
    shape = x.shape
    q, s = act_quant(x.reshape(-1, shape[-1]))
    return fp8_gemm(q, s, weight, weight_scale_inv, x.dtype).view(*shape[:-1], weight.shape[0])
