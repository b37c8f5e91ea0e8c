"""Products whose every output row is independent of the other rows: the batch-invariant mode.

cuBLAS, oneDNN and MKL choose their kernel, tiling and split of the reduction by the number of
rows, so the bits of one sequence's row change with the sequences batched beside it (and with
CUDA graphs' padding). Greedy decoding then drifts: a last-bit difference flips an FP8 rounding or
a near tie of the router and the next token changes. vLLM (VLLM_BATCH_INVARIANT) and SGLang
(--enable-deterministic-inference) offer a mode without this; so does mlaserve, `batch_invariant`
(kernels/backend.py), on the kernel path: the dense products below run one Triton kernel with
one tile shape whatever the rows, reducing K in order without a split, and decode attention runs
unsplit (kernels/mla_decode.py); the FP8 GEMM and the fused routed experts, which reduce each row
alone in K order, keep one tile too (on a GPU theirs follow M). The norms are per row already.

Elsewhere, and with the mode off, these are torch's F.linear and bmm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.backend import batch_invariant, cdiv, interpreting, triton_wanted


def tile() -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K), the same for every product: which shape matters less than
    that it never changes with M. The interpreter takes wider tiles (fewer programs, each one
    numpy call): the tests' kernel path runs its products several times faster so."""
    return (32, 256, 256) if interpreting() else (32, 64, 64)


@triton.jit
def _invariant_bmm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn, scb, scm, scn,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + batch * sab + rm[:, None].to(tl.int64) * sam
    b_cols = b_ptr + batch * sbb + rn[None, :].to(tl.int64) * sbn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        a = tl.load(a_rows + k[None, :] * sak, mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_cols + k[:, None] * sbk, mask=(k[:, None] < K) & (rn[None, :] < N), other=0.0)
        if UPCAST:  # see backend.interpreting
            a, b = a.to(tl.float32), b.to(tl.float32)
        if IEEE:  # float32 operands: full products, not TF32's
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    c = c_ptr + batch * scb + rm[:, None].to(tl.int64) * scm + rn[None, :] * scn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def invariant_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, M, K] @ b [B, K, N] -> [B, M, N] in a's dtype, any strides, through the Triton kernel."""
    batches, m, k = a.shape
    if b.shape[0] != batches or b.shape[1] != k:
        raise ValueError(f"invariant_bmm: {tuple(a.shape)} @ {tuple(b.shape)}")
    n = b.shape[2]
    c = torch.empty(batches, m, n, dtype=a.dtype, device=a.device)
    if c.numel():
        block_m, block_n, block_k = tile()
        _invariant_bmm_kernel[(cdiv(m, block_m), cdiv(n, block_n), batches)](
            a, b, c, m, n, k, *a.stride(), *b.stride(), *c.stride(), BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, UPCAST=interpreting(), IEEE=a.dtype == torch.float32, num_warps=4)
    return c


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K]ᵀ, as F.linear; row-invariant in the batch-invariant mode."""
    if not (batch_invariant() and triton_wanted(x)):
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1])
    return invariant_bmm(rows[None], weight.t()[None])[0].view(*x.shape[:-1], weight.shape[0])


def dense_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """As torch.bmm; row-invariant in the batch-invariant mode."""
    if not (batch_invariant() and triton_wanted(a)):
        return torch.bmm(a, b)
    return invariant_bmm(a, b)
