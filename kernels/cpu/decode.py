"""Paged MLA decode attention and the FP8 cache's gather (kernels/csrc/mla_decode_cpu.cpp)."""

from __future__ import annotations

import torch

from kernels import cpu_build, latent_fp8
from kernels.cpu import F32, I32, I64, P, declare, last_dim_contiguous, library, ptr, require_host, split_threads
from kernels.cpu_build import VARIANT_ID

declare("mla_decode", q_latent=P, ql_row=I64, ql_head=I64, q_pe=P, qp_row=I64, qp_head=I64, cache=P, tables=P,
        table_stride=I64, seq_of_row=P, kv_lens=P, out=P, out_row=I64, out_head=I64, partial=P, rows=I32,
        heads=I32, rank=I32, rope=I32, page=I32, splits=I32, scale=F32, elem_bytes=I32, cache_fp8=I32, impl=I32,
        num_threads=I32)
declare("latent_fp8_gather_bf16", cache=P, slots=P, n=I64, rank=I32, rope=I32, out=P, num_threads=I32)
declare("mla_decode_impls")


def choose_impl(dtype: torch.dtype, heads: int, rank: int, rope: int, page: int) -> str:
    """The fastest of the decode family's variant and those below it that takes these shapes
    (DeepSeek-V3's, in bf16, take all three): AMX (matrix tiles) over AVX-512 BF16 (vector dot
    products) over the portable loops."""
    top = cpu_build.variant("decode") or "generic"
    if dtype == torch.bfloat16 and rank % 32 == 0 and rope % 32 == 0:
        if top == "amx" and heads % 8 == 0 and page % 16 == 0:
            return "amx"
        if top in ("avx512", "amx") and heads % 4 == 0 and rank % 64 == 0:
            return "avx512"
    return "generic"


def choose_num_splits(rows: int, max_kv_len: int, page: int, threads: int) -> int:
    """Enough (row, split) pieces for every thread twice over, each at least two blocks long."""
    if rows >= 2 * threads:
        return 1
    blocks = -(-max_kv_len // page)
    return max(1, min(-(-2 * threads // max(rows, 1)), blocks // 2))


def paged_mla_decode_cpu(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_of_row: torch.Tensor, kv_lens: torch.Tensor,
                         softmax_scale: float, max_kv_len: int, num_splits: int | None = None,
                         impl: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The contract of `kernels.mla_decode.paged_mla_decode`, on CPU tensors, through the compiled
    kernel (the caller checks `library("decode")` first). Queries and `out` ([rows, heads, rank], written
    when given) may have any row and head strides, e.g. a transposed [heads, rows, ...] tensor.
    The cache is of the queries' dtype, or uint8 in the FP8 layout of kernels/latent_fp8.py.
    `impl` (a name from cpu_build.VARIANTS, at most the family's variant) overrides `choose_impl`."""
    lib = library("decode")
    if lib is None:
        raise RuntimeError("the CPU decode kernel is not built or is turned off (see kernels/cpu_build.py)")
    require_host("paged_mla_decode_cpu", q_latent, q_pe, cache, block_tables, seq_of_row, kv_lens,
                  *([out] if out is not None else []))
    _check_decode_operands(q_latent, q_pe, cache)
    dtype, fp8 = q_latent.dtype, latent_fp8.is_fp8(cache)
    rows, heads, rank = q_latent.shape
    rope, page = q_pe.shape[-1], cache.shape[1]
    q_latent, q_pe, cache = last_dim_contiguous(q_latent), last_dim_contiguous(q_pe), cache.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    seq_of_row = seq_of_row.to(torch.int32).contiguous()
    kv_lens = kv_lens.to(torch.int32).contiguous()
    if out is None:
        out = torch.empty(rows, heads, rank, dtype=dtype)
    elif out.shape != q_latent.shape or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q_latent.shape)} {dtype} with a contiguous last dim")
    splits = num_splits or choose_num_splits(rows, max_kv_len, page, split_threads())
    partial = torch.empty(rows * splits * heads * (rank + 2) if splits > 1 else 0, dtype=torch.float32)
    impl = impl or choose_impl(dtype, heads, rank, rope, page)
    rc = lib.mla_decode(ptr(q_latent), q_latent.stride(0), q_latent.stride(1), ptr(q_pe), q_pe.stride(0),
                        q_pe.stride(1), ptr(cache), ptr(tables), tables.stride(0), ptr(seq_of_row),
                        ptr(kv_lens), ptr(out), out.stride(0), out.stride(1), ptr(partial), rows, heads, rank,
                        rope, page, splits, float(softmax_scale), q_latent.element_size(), int(fp8), VARIANT_ID[impl],
                        torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"mla_decode ({impl}) refused rows={rows} heads={heads} rank={rank} rope={rope} "
                           f"page={page} dtype={dtype}")
    return out


def _check_decode_operands(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor) -> None:
    dtype = q_latent.dtype
    fp8 = latent_fp8.is_fp8(cache)
    if dtype not in (torch.float32, torch.bfloat16) or (cache.dtype != dtype and not fp8) or q_pe.dtype != dtype:
        raise TypeError(f"paged_mla_decode_cpu wants float32 or bfloat16 queries and a cache of their dtype "
                        f"(or uint8, FP8 entries), got {q_latent.dtype}, {q_pe.dtype} and {cache.dtype}")
    rank, rope = q_latent.shape[-1], q_pe.shape[-1]
    width = latent_fp8.entry_bytes(rank, rope) if fp8 else rank + rope
    if cache.shape[-1] != width:
        raise ValueError(f"cache entries are {cache.shape[-1]} wide, queries {rank} + {rope} want {width}")


def latent_fp8_gather(cache: torch.Tensor, slots: torch.Tensor, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """FP8 cache rows `slots` dequantized, [len(slots), rank + rope] in `dtype`: compiled in bf16
    on the host with AVX-512 (one pass; 0.30 ms against torch's 4.5 ms for 2048 rows), else
    kernels.latent_fp8's torch code."""
    lib = library("decode")
    flat = cache.view(-1, cache.shape[-1])
    if dtype == torch.bfloat16 and cache.device.type == "cpu" and cpu_build.variant("decode") in ("avx512", "amx"):
        rope = (cache.shape[-1] - latent_fp8.entry_bytes(rank, 0)) // 2
        slots = slots.to(torch.int64).contiguous()
        out = torch.empty(slots.numel(), rank + rope, dtype=dtype)
        if lib.latent_fp8_gather_bf16(ptr(flat), ptr(slots), slots.numel(), rank, rope, ptr(out),
                                      torch.get_num_threads()) == 0:
            return out
    return latent_fp8.dequantize_entries(flat.index_select(0, slots), rank, dtype)
