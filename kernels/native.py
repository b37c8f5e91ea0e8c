"""The CPU path's compiled kernels (kernels/csrc), called through ctypes: their signatures and
their torch-facing contracts. kernels/cpu_build.py builds the library per instruction-set
variant and says which variant each kernel family runs (`library(family)`: None where the
family's torch implementation runs).
"""

from __future__ import annotations

import ctypes

import torch

from kernels import cpu_build, latent_fp8
from kernels.cpu_build import VARIANT_ID


@cpu_build.on_load
def _bind(lib: ctypes.CDLL) -> None:
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.mla_decode.argtypes = [p, i64, i64, p, i64, i64, p, p, i64, p, p, p, i64, i64, p,
                               i32, i32, i32, i32, i32, i32, f32, i32, i32, i32, i32]
    lib.mla_decode.restype = i32
    lib.latent_fp8_gather_bf16.argtypes = [p, p, i64, i32, i32, p, i32]
    lib.latent_fp8_gather_bf16.restype = i32
    lib.mla_decode_impls.argtypes = []
    lib.mla_decode_impls.restype = i32
    lib.moe_routed.argtypes = [p, i64, i64, p, p, i32, i32, i32, p, p, p, i64, p, p, i64, i32, i32, i32]
    lib.moe_routed.restype = i32
    lib.rms_norm_bf16.argtypes = [p, i64, p, i64, p, i64, p, p, i64, i64, i32, f32, i32]
    lib.rms_norm_bf16.restype = i32
    lib.prefill_attention.argtypes = [p, i64, i64, p, i64, i64, p, i64, i64, p, i64, i64, p, i64, i64, p, i64, i64,
                                      p, p, p, p, i32, i32, i32, i32, i32, f32, i32]
    lib.prefill_attention.restype = i32
    lib.silu_mul_bf16.argtypes = [p, i64, p, i64, i64, i32, i32]
    lib.silu_mul_bf16.restype = i32
    lib.moe_gate.argtypes = [p, i64, p, p, i64, i32, i32, i32, i32, i32, i32, f32, p, p, i32]
    lib.moe_gate.restype = i32
    lib.mla_cache_entries_bf16.argtypes = [p, i64, p, i64, p, i64, i64, i32, p, f32, p, i64, p, p, p, i64, i32, i32,
                                           i64, i32, i32]
    lib.mla_cache_entries_bf16.restype = i32
    lib.linear_bf16.argtypes = [p, i64, i64, i64, p, i32, i32, i32, p, i64, i64, i32]
    lib.linear_bf16.restype = i32


def library(family: str = "decode") -> ctypes.CDLL | None:
    """The build `family`'s kernels run from (kernels/cpu_build.py: FAMILIES), or None."""
    return cpu_build.family_library(family)


def prebuild() -> None:
    """Builds (or finds built) every library a family will call, so that no step waits on it."""
    for family in cpu_build.FAMILIES:
        library(family)


def runs(family: str, *tensors: torch.Tensor) -> bool:
    """Whether `family`'s compiled kernels take these tensors: bf16 on the host, the family on
    a compiled variant."""
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors) and library(family) is not None


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _require_host(kernel: str, *tensors: torch.Tensor) -> None:
    """The compiled kernels read host memory through raw pointers: anything else is refused."""
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError(f"{kernel} reads host memory: got tensors on {sorted({str(t.device) for t in tensors})}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


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
    _require_host("paged_mla_decode_cpu", q_latent, q_pe, cache, block_tables, seq_of_row, kv_lens,
                  *([out] if out is not None else []))
    dtype = q_latent.dtype
    fp8 = latent_fp8.is_fp8(cache)
    if dtype not in (torch.float32, torch.bfloat16) or (cache.dtype != dtype and not fp8) or q_pe.dtype != dtype:
        raise TypeError(f"paged_mla_decode_cpu wants float32 or bfloat16 queries and a cache of their dtype "
                        f"(or uint8, FP8 entries), got {q_latent.dtype}, {q_pe.dtype} and {cache.dtype}")
    rows, heads, rank = q_latent.shape
    rope = q_pe.shape[-1]
    page = cache.shape[1]
    width = latent_fp8.entry_bytes(rank, rope) if fp8 else rank + rope
    if cache.shape[-1] != width:
        raise ValueError(f"cache entries are {cache.shape[-1]} wide, queries {rank} + {rope} want {width}")
    q_latent, q_pe, cache = _last_dim_contiguous(q_latent), _last_dim_contiguous(q_pe), cache.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    seq_of_row = seq_of_row.to(torch.int32).contiguous()
    kv_lens = kv_lens.to(torch.int32).contiguous()
    if out is None:
        out = torch.empty(rows, heads, rank, dtype=dtype)
    elif out.shape != q_latent.shape or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q_latent.shape)} {dtype} with a contiguous last dim")
    threads = torch.get_num_threads()
    splits = num_splits or choose_num_splits(rows, max_kv_len, page, threads)
    partial = torch.empty(rows * splits * heads * (rank + 2) if splits > 1 else 0, dtype=torch.float32)
    impl = impl or choose_impl(dtype, heads, rank, rope, page)
    rc = lib.mla_decode(_ptr(q_latent), q_latent.stride(0), q_latent.stride(1), _ptr(q_pe), q_pe.stride(0),
                        q_pe.stride(1), _ptr(cache), _ptr(tables), tables.stride(0), _ptr(seq_of_row),
                        _ptr(kv_lens), _ptr(out), out.stride(0), out.stride(1), _ptr(partial), rows, heads, rank,
                        rope, page, splits, float(softmax_scale), q_latent.element_size(), int(fp8), VARIANT_ID[impl],
                        threads)
    if rc != 0:
        raise RuntimeError(f"mla_decode ({impl}) refused rows={rows} heads={heads} rank={rank} rope={rope} "
                           f"page={page} dtype={dtype}")
    return out


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
        if lib.latent_fp8_gather_bf16(_ptr(flat), _ptr(slots), slots.numel(), rank, rope, _ptr(out),
                                      torch.get_num_threads()) == 0:
            return out
    return latent_fp8.dequantize_entries(flat.index_select(0, slots), rank, dtype)


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
    _require_host("moe_routed", x, weights, ids, gate_up_pairs, down_pairs, *([add] if add is not None else []))
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
    x = _last_dim_contiguous(x)
    if add is not None:
        add = _last_dim_contiguous(add)
    ids = ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    out = torch.empty(tokens, hidden, dtype=torch.bfloat16)
    if tokens == 0:
        return out
    choices = torch.empty(tokens * k, hidden, dtype=torch.bfloat16)
    rc = lib.moe_routed(_ptr(x), x.stride(0), tokens, _ptr(ids), _ptr(weights), k, first_expert, n,
                        _ptr(gate_up_pairs), _ptr(down_pairs), _ptr(add) if add is not None else None,
                        add.stride(0) if add is not None else 0, _ptr(choices), _ptr(out), out.stride(0), hidden,
                        inter, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"moe_routed refused hidden={hidden} inter={inter} k={k}")
    return out


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
    _require_host("linear", x, strips)
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
    x2, stride = _rows(_last_dim_contiguous(x))
    out = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    rc = library("linear").linear_bf16(_ptr(x2), stride, 0, x2.shape[0], _ptr(strips), k, n, 1, _ptr(out), n, 0,
                               torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"linear refused K={k} N={n}")
    return out


def linear_heads(x: torch.Tensor, strips: torch.Tensor) -> torch.Tensor:
    """Per head h, x[:, h] W_h^T for strips = pack_strips(W [H, N, K]): x [T, H, K] (bf16 on the
    host, any row and head strides) -> [T, H, N], as `linear` rounds (MLA's absorbed products)."""
    n, k = _check_linear(x, strips, 2)
    x = _last_dim_contiguous(x)
    t, heads = x.shape[:2]
    out = torch.empty(t, heads, n, dtype=torch.bfloat16)
    rc = library("linear").linear_bf16(_ptr(x), x.stride(0), x.stride(1), t, _ptr(strips), k, n, heads, _ptr(out),
                               out.stride(0), out.stride(1), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"linear_heads refused K={k} N={n}")
    return out


def rms_norm_available(x: torch.Tensor) -> bool:
    """Whether `rms_norm` takes x: bf16 host rows with a contiguous last dim, the norm family on
    a compiled variant."""
    return x.dim() >= 1 and x.stride(-1) == 1 and runs("norm", x)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t as [rows, cols] without copying where its leading dims flatten into one row stride."""
    flat = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return flat, flat.stride(0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """model/layers.py's RMSNorm of x (bf16, any row stride) through the compiled kernel. With
    `residual`, normalizes h = x + residual instead and returns (norm(h), h), the add fused in."""
    lib = library("norm")
    tensors = [x, weight] + ([residual] if residual is not None else [])
    _require_host("rms_norm", *tensors)
    cols = x.shape[-1]
    if any(t.dtype != torch.bfloat16 for t in tensors) or weight.shape != (cols,) or (
            residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}"
                         + (f", residual {tuple(residual.shape)} {residual.dtype}" if residual is not None else "")
                         + ": wants bf16 rows and a weight as wide")
    x2, x_stride = _rows(_last_dim_contiguous(x))
    out = torch.empty(x.shape, dtype=x.dtype)
    weight = weight.contiguous()
    if residual is None:
        y2, y_stride, h = None, 0, None
    else:
        y2, y_stride = _rows(_last_dim_contiguous(residual))
        h = torch.empty(x.shape, dtype=x.dtype)
    rc = lib.rms_norm_bf16(_ptr(x2), x_stride, _ptr(y2) if y2 is not None else None, y_stride,
                           _ptr(h) if h is not None else None, cols, _ptr(weight), _ptr(out), cols,
                           x2.shape[0], cols, float(eps), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"rms_norm refused rows of {cols}")
    return out if h is None else (out, h)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for h = [gate | up] ([..., 2 * cols], bf16 on the host, any row stride)
    through the compiled kernel, with the reference's two bf16 roundings -> [..., cols]."""
    lib = library("activation")
    _require_host("silu_mul", h)
    cols = h.shape[-1] // 2
    if h.dtype != torch.bfloat16 or h.shape[-1] != 2 * cols or cols == 0:
        raise ValueError(f"silu_mul: h {tuple(h.shape)} {h.dtype} (want bf16 [..., 2 * cols])")
    h2, stride = _rows(_last_dim_contiguous(h))
    out = torch.empty(*h.shape[:-1], cols, dtype=h.dtype)
    rc = lib.silu_mul_bf16(_ptr(h2), stride, _ptr(out), cols, h2.shape[0], cols, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"silu_mul refused rows of {cols}")
    return out


def prefill_attention_available(dtype: torch.dtype, nope_dim: int, rope_dim: int, v_dim: int) -> bool:
    """Whether `prefill_attention` runs here: bf16, the prefill family on a compiled variant, the
    key parts' widths multiples of 32 and the values' of 64 (DeepSeek-V3: 128 + 64 and 128).
    MLASERVE_CPU_PREFILL=off turns it off (torch's fused attention instead)."""
    return (dtype == torch.bfloat16 and nope_dim % 32 == 0 and rope_dim % 32 == 0 and v_dim % 64 == 0
            and library("prefill") is not None)


def prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                      v: torch.Tensor, spans: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """Causal attention of prefill chunks, all of them in one call, with queries [q_nope | q_pe]
    and keys [k_nope | k_pe] given in their two parts: q_nope [T, H, Dn], q_pe [T, H, R],
    k_nope [L, H, Dn], k_pe [L, H, R] (an expanded view, head stride 0, shares a row among the
    heads), v [L, H, Dv], out [T, H, Dv] (written for the chunks' queries), bf16, any row and head
    strides; spans [4, chunks] int64: query start, query count, key start, key count (>= the query
    count); query i of a chunk sits at position key count - query count + i and sees the keys up to it."""
    lib = library("prefill")
    _require_host("prefill_attention", q_nope, q_pe, k_nope, k_pe, v, spans, out)
    tokens, heads, dn = q_nope.shape
    rope, length, dv = q_pe.shape[2], k_nope.shape[0], v.shape[2]
    if (any(t.dtype != torch.bfloat16 for t in (q_nope, q_pe, k_nope, k_pe, v, out))
            or q_pe.shape[:2] != (tokens, heads) or k_nope.shape != (length, heads, dn)
            or k_pe.shape != (length, heads, rope) or v.shape[:2] != (length, heads)
            or out.shape != (tokens, heads, dv) or spans.shape[0] != 4):
        raise ValueError(f"prefill_attention: q {tuple(q_nope.shape)} + {tuple(q_pe.shape)}, k {tuple(k_nope.shape)} "
                         f"+ {tuple(k_pe.shape)}, v {tuple(v.shape)}, out {tuple(out.shape)} (want bf16 [T, H, Dn] + "
                         "[T, H, R], [L, H, Dn] + [L, H, R], [L, H, Dv], [T, H, Dv])")
    q_nope, q_pe, k_nope, k_pe, v = map(_last_dim_contiguous, (q_nope, q_pe, k_nope, k_pe, v))
    if out.stride(-1) != 1:
        raise ValueError("prefill_attention: out needs a contiguous last dim")
    spans = spans.to(torch.int64).contiguous()
    q_start, q_len, k_start, k_len = spans
    if spans.shape[1] and (int((q_start + q_len).max()) > tokens or int((k_start + k_len).max()) > length):
        raise ValueError("prefill_attention: a span reaches past its tensor")
    rc = lib.prefill_attention(_ptr(q_nope), q_nope.stride(0), q_nope.stride(1), _ptr(q_pe), q_pe.stride(0),
                               q_pe.stride(1), _ptr(k_nope), k_nope.stride(0), k_nope.stride(1), _ptr(k_pe),
                               k_pe.stride(0), k_pe.stride(1), _ptr(v), v.stride(0), v.stride(1), _ptr(out),
                               out.stride(0), out.stride(1), _ptr(q_start), _ptr(q_len), _ptr(k_start), _ptr(k_len),
                               spans.shape[1], heads, dn, dn + rope, dv, float(scale), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"prefill_attention refused heads={heads} Dn={dn} D={dn + rope} Dv={dv} (or a span with "
                           "fewer keys than queries)")


def moe_gate(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, k: int,
             normalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """model/moe.py's Gate through the compiled kernel: x [T, hidden] bf16 (any row stride), the
    gate's weight transposed, weight_t [hidden, E], and bias [E] float32 -> (weights [T, k] float32,
    ids [T, k] int64), best first."""
    lib = library("gate")
    _require_host("moe_gate", x, weight_t, bias)
    tokens, hidden = x.shape
    experts = weight_t.shape[1]
    if (x.dtype != torch.bfloat16 or weight_t.dtype != torch.float32 or bias.dtype != torch.float32
            or weight_t.shape[0] != hidden or bias.shape != (experts,)):
        raise ValueError(f"moe_gate: x {tuple(x.shape)} {x.dtype}, weight_t {tuple(weight_t.shape)} "
                         f"{weight_t.dtype}, bias {tuple(bias.shape)} {bias.dtype} (want bf16 x, float32 "
                         "weight and bias)")
    x = _last_dim_contiguous(x)
    weight_t, bias = weight_t.contiguous(), bias.contiguous()
    weights = torch.empty(tokens, k, dtype=torch.float32)
    ids = torch.empty(tokens, k, dtype=torch.int64)
    rc = lib.moe_gate(_ptr(x), x.stride(0), _ptr(weight_t), _ptr(bias), tokens, hidden, experts, n_group, topk_group, k,
                      int(normalize), float(scaling), _ptr(weights), _ptr(ids), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"moe_gate refused {experts} experts in {n_group} groups, top {topk_group} groups, k={k}")
    return weights, ids


def mla_cache_entries(c_kv: torch.Tensor, k_pe: torch.Tensor, q_pe: torch.Tensor, norm_weight: torch.Tensor,
                      eps: float, rotations: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                      cache: torch.Tensor) -> None:
    """model/mla.py's cache write and rope in one compiled pass (bf16 on the host): writes
    [rms_norm(c_kv) | rope(k_pe)] into the cache rows `slots` ([num_blocks, block_size, entry] cache,
    bf16, or uint8 in the FP8 layout, quantized as latent_fp8.quantize_entries does) and rotates
    q_pe [T, H, rope] in place. rotations: the RotaryEmbedding's complex64 table."""
    lib = library("norm")
    _require_host("mla_cache_entries", c_kv, k_pe, q_pe, norm_weight, rotations, positions, slots, cache)
    tokens, rank = c_kv.shape
    rope = k_pe.shape[-1]
    fp8 = latent_fp8.is_fp8(cache)
    width = latent_fp8.entry_bytes(rank, rope) if fp8 else rank + rope
    if (any(t.dtype != torch.bfloat16 for t in (c_kv, k_pe, q_pe, norm_weight))
            or not (fp8 or cache.dtype == torch.bfloat16)
            or rotations.dtype != torch.complex64 or rotations.shape[-1] * 2 != rope
            or cache.shape[-1] != width or q_pe.shape[0] != tokens or q_pe.shape[-1] != rope
            or k_pe.shape[0] != tokens or norm_weight.shape != (rank,) or not cache.is_contiguous()
            or any(t.stride(-1) != 1 for t in (c_kv, k_pe, q_pe))):
        raise ValueError(f"mla_cache_entries: c_kv {tuple(c_kv.shape)}, k_pe {tuple(k_pe.shape)}, "
                         f"q_pe {tuple(q_pe.shape)}, cache {tuple(cache.shape)} {cache.dtype} do not fit")
    positions = positions.to(torch.int64).contiguous()
    slots = slots.to(torch.int64).contiguous()
    rotations = rotations.contiguous()
    rc = lib.mla_cache_entries_bf16(_ptr(c_kv), c_kv.stride(0), _ptr(k_pe), k_pe.stride(0), _ptr(q_pe),
                                    q_pe.stride(0), q_pe.stride(1), q_pe.shape[1], _ptr(norm_weight.contiguous()),
                                    float(eps), _ptr(rotations), rotations.shape[0], _ptr(positions), _ptr(slots),
                                    _ptr(cache), cache.numel() // cache.shape[-1], rank, rope, tokens, int(fp8),
                                    torch.get_num_threads())
    if rc == -2:
        raise ValueError("mla_cache_entries: a position past the rope table or a slot past the cache")
    if rc != 0:
        raise RuntimeError(f"mla_cache_entries refused rank={rank} rope={rope}")
