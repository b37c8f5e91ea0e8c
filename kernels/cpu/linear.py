"""The dense bf16 linear and MLA's per-head absorbed products (kernels/csrc/linear_cpu.cpp), on weights
packed once into the AMX tiles' strip layout."""

from __future__ import annotations

import torch

from kernels import cpu_build
from kernels.cpu import I32, I64, P, as_rows, declare, last_dim_contiguous, library, ptr, require_host, runs

declare("linear_bf16", x=P, x_row=I64, x_head=I64, rows=I64, strips=P, K=I32, N=I32, heads=I32, out=P, out_row=I64,
        out_head=I64, num_threads=I32)


LINEAR_STRIP = 32  # output columns per strip of linear_cpu.cpp's weight layout
# Above this many rows torch's matmul is as fast (its per-call re-layout of the weight is paid
# back). AMX: at 2048 rows the small model's linears ran 1-2% slower in a prefill step through
# `linear`, and at 256 rows (a decode step) 3-5% faster. AVX-512 BF16 against torch's oneDNN on
# the same instructions (benchmarks/cpu_avx512_paths.py, DeepSeek-V3's linears at a quarter
# width): 1.05-1.55x at 1 and 32 rows, 0.94-1.04x at 128, 0.94-0.98x at 1024.
LINEAR_MAX_ROWS = {"amx": 1024, "avx512": 64}


def linear_max_rows() -> int:
    """The most rows `linear` takes on the linear family's variant (0: it does not run)."""
    return LINEAR_MAX_ROWS.get(cpu_build.variant("linear"), 0)


def linear_available(weight: torch.Tensor) -> bool:
    """Whether `linear` can take this [N, K] weight: bf16 on the host, the linear family on a
    compiled variant, K and N multiples of 32 (every DeepSeek-V3 linear but the vocabulary's)."""
    return (weight.dim() == 2 and weight.shape[0] % LINEAR_STRIP == 0 and weight.shape[1] % 32 == 0
            and runs("linear", weight))


def pack_strips(weight: torch.Tensor, width: int = LINEAR_STRIP) -> torch.Tensor:
    """W [..., N, K] -> [..., N / width, K / 2, width, 2]: strips of `width` output columns, each a
    contiguous run of K / 2 rows of interleaved pairs, the layout AMX tiles take as B, streamed in
    order (leading dims: one weight per head or per expert). `linear` takes width 32,
    `moe_routed` EXPERT_STRIP."""
    *lead, n, k = weight.shape
    return weight.view(*lead, n // width, width, k // 2, 2).transpose(-3, -2).contiguous()


def unpack_strips(strips: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_strips`: [..., N / width, K / 2, width, 2] -> [..., N, K]."""
    *lead, s, half, cols, _ = strips.shape
    return strips.transpose(-3, -2).reshape(*lead, s * cols, 2 * half)


def _check_linear(x: torch.Tensor, strips: torch.Tensor, dims: int) -> tuple[int, int]:
    if x.device.type != "cpu" or strips.device.type != "cpu":
        require_host("linear", x, strips)
    s, half, cols, _ = strips.shape[-4:]
    n, k = s * cols, 2 * half
    if (x.dtype != torch.bfloat16 or strips.dtype != torch.bfloat16 or x.shape[-1] != k or cols != LINEAR_STRIP
            or strips.dim() != dims + 3 or (dims == 2 and (x.dim() != 3 or x.shape[1] != strips.shape[0]))):
        raise ValueError(f"linear: x {tuple(x.shape)} {x.dtype}, strips {tuple(strips.shape)} {strips.dtype} "
                         f"(want bf16 x [..., {k}] and strips [N / {LINEAR_STRIP}, K / 2, {LINEAR_STRIP}, 2], "
                         "or per head: x [T, H, K] and strips [H, ...])")
    return n, k


def linear(x: torch.Tensor, strips: torch.Tensor) -> torch.Tensor:
    """x [..., K] (bf16 on the host, any row stride) times W^T for strips = pack_strips(W):
    float32 sums rounded once to bf16 -> [..., N]."""
    n, k = _check_linear(x, strips, 1)
    x2, stride = as_rows(last_dim_contiguous(x))
    out = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    rc = library("linear").linear_bf16(ptr(x2), stride, 0, x2.shape[0], ptr(strips), k, n, 1, ptr(out), n, 0,
                               torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"linear refused K={k} N={n}")
    return out


def linear_heads(x: torch.Tensor, strips: torch.Tensor) -> torch.Tensor:
    """Per head h, x[:, h] W_h^T for strips = pack_strips(W [H, N, K]): x [T, H, K] (bf16 on the
    host, any row and head strides) -> [T, H, N], as `linear` rounds (MLA's absorbed products)."""
    n, k = _check_linear(x, strips, 2)
    x = last_dim_contiguous(x)
    t, heads = x.shape[:2]
    out = torch.empty(t, heads, n, dtype=torch.bfloat16)
    rc = library("linear").linear_bf16(ptr(x), x.stride(0), x.stride(1), t, ptr(strips), k, n, heads, ptr(out),
                               out.stride(0), out.stride(1), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"linear_heads refused K={k} N={n}")
    return out
