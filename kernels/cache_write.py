"""MLA's write into the paged latent cache, with the queries' rope, as one operation:

    cache[slots[t]] = [kv_a_layernorm(c_kv[t]) | rope(k_pe[t], positions[t])]
    q_pe[t, h]      = rope(q_pe[t, h], positions[t])

For an FP8 cache the entry is stored in kernels/latent_fp8.py's layout, quantized from the entry
in the model's dtype exactly as `latent_fp8.quantize_entries` quantizes it. Three paths behind
`write_latent_entries`: a Triton kernel where Triton runs (one program per token), the compiled
CPU pass for bf16 on the host, and the torch reference elsewhere. The reference dispatches 18
operators per layer (35 for an FP8 cache), each a launch on CUDA, where a decode step is
launch-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import latent_fp8, native
from kernels.backend import triton_wanted
from kernels.quant import round_to_dtype_grid, round_to_e4m3_grid
from kernels.rms_norm import rms_norm_ref
from kernels.rope import rotate


def write_latent_entries_ref(c_kv: torch.Tensor, k_pe: torch.Tensor, q_pe: torch.Tensor, norm_weight: torch.Tensor,
                             eps: float, rotations: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                             cache: torch.Tensor) -> torch.Tensor:
    """Same contract as `write_latent_entries`, in plain torch; q_pe is not modified."""
    entry = torch.cat([rms_norm_ref(c_kv, norm_weight, eps), rotate(k_pe, rotations, positions)], dim=-1)
    rows = cache.view(-1, cache.shape[-1])
    if latent_fp8.is_fp8(cache):
        rank = c_kv.shape[-1]
        rows[slots] = latent_fp8.quantize_entries(entry[:, :rank], entry[:, rank:])
    else:
        rows[slots] = entry.to(cache.dtype)
    return rotate(q_pe, rotations, positions)


@triton.jit
def _rotate_pairs(even, odd, cos, sin):
    """(even + i odd) * (cos + i sin), in float32."""
    return even * cos - odd * sin, even * sin + odd * cos


@triton.jit
def _write_latent_kernel(
    ckv_ptr, ckv_stride, kpe_ptr, kpe_stride, q_ptr, q_row_stride, q_head_stride, heads,
    w_ptr, eps, rot_ptr, pos_ptr, slot_ptr, cache_ptr,
    RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
    FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    dtype = ckv_ptr.dtype.element_ty

    # Blocks are powers of two: RANK, ROPE / 2 and the heads are masked into them.
    cols = tl.arange(0, BLOCK_R)
    in_rank = cols < RANK
    x = tl.load(ckv_ptr + t * ckv_stride + cols, mask=in_rank, other=0.0).to(tl.float32)
    # The reference's two roundings: normalized in float32, cast to the model's dtype, then times
    # the weight (a product in that dtype). IEEE division and square root, as torch's.
    inv = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.sum(x * x, 0) / RANK + eps))
    w = tl.load(w_ptr + cols, mask=in_rank, other=0.0).to(tl.float32)
    normed = round_to_dtype_grid(round_to_dtype_grid(x * inv, dtype) * w, dtype)  # float32, dtype's values

    pairs = tl.arange(0, BLOCK_P)
    in_rope = pairs < ROPE // 2
    cos = tl.load(rot_ptr + pos * ROPE + 2 * pairs, mask=in_rope, other=0.0)
    sin = tl.load(rot_ptr + pos * ROPE + 2 * pairs + 1, mask=in_rope, other=0.0)
    k_even = tl.load(kpe_ptr + t * kpe_stride + 2 * pairs, mask=in_rope, other=0.0).to(tl.float32)
    k_odd = tl.load(kpe_ptr + t * kpe_stride + 2 * pairs + 1, mask=in_rope, other=0.0).to(tl.float32)
    k_even, k_odd = _rotate_pairs(k_even, k_odd, cos, sin)

    h = tl.arange(0, BLOCK_H)[:, None]
    q_at = q_ptr + t * q_row_stride + h * q_head_stride + 2 * pairs[None, :]
    live = (h < heads) & in_rope[None, :]
    q_even = tl.load(q_at, mask=live, other=0.0).to(tl.float32)
    q_odd = tl.load(q_at + 1, mask=live, other=0.0).to(tl.float32)
    q_even, q_odd = _rotate_pairs(q_even, q_odd, cos[None, :], sin[None, :])
    tl.store(q_at, round_to_dtype_grid(q_even, dtype).to(dtype), mask=live)
    tl.store(q_at + 1, round_to_dtype_grid(q_odd, dtype).to(dtype), mask=live)

    if FP8:
        GROUPS: tl.constexpr = RANK // 128
        row = cache_ptr + slot * (RANK + 4 * GROUPS + 2 * ROPE)
        groups = tl.reshape(normed, [BLOCK_R // 128, 128])  # padding groups are zeros
        ratio = tl.maximum(tl.math.div_rn(tl.max(tl.abs(groups), 1), 448.0), 2.0 ** -40)
        # The smallest power of two at least ratio (ratio is a normal float): its exponent, one up
        # unless ratio is a power of two already; and its inverse, exponent mirrored.
        bits = ratio.to(tl.int32, bitcast=True)
        exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale = (exponent << 23).to(tl.float32, bitcast=True)
        inverse = ((254 - exponent) << 23).to(tl.float32, bitcast=True)
        scaled = groups * inverse[:, None]
        # Rounded by magnitude with the sign put back, so that a negative value rounding to zero
        # keeps its sign bit, as torch's cast does.
        magnitude = round_to_e4m3_grid(tl.abs(scaled))
        rounded = tl.where(scaled < 0, -magnitude, magnitude)
        tl.store(row.to(tl.pointer_type(tl.float8e4nv)) + cols, tl.reshape(rounded, [BLOCK_R]).to(tl.float8e4nv),
                 mask=in_rank)
        group = tl.arange(0, BLOCK_R // 128)
        tl.store((row + RANK).to(tl.pointer_type(tl.float32)) + group, scale, mask=group < GROUPS)
        rope_at = (row + RANK + 4 * GROUPS).to(tl.pointer_type(tl.bfloat16))
    else:
        row = cache_ptr + slot * (RANK + ROPE)
        cache_dtype: tl.constexpr = cache_ptr.dtype.element_ty
        tl.store(row + cols, round_to_dtype_grid(normed, cache_dtype).to(cache_dtype), mask=in_rank)
        rope_at = row + RANK
    # The reference rounds the rotated key to the model's dtype before the cache's.
    store_as: tl.constexpr = rope_at.dtype.element_ty
    k_even = round_to_dtype_grid(round_to_dtype_grid(k_even, dtype), store_as)
    k_odd = round_to_dtype_grid(round_to_dtype_grid(k_odd, dtype), store_as)
    tl.store(rope_at + 2 * pairs, k_even.to(store_as), mask=in_rope)
    tl.store(rope_at + 2 * pairs + 1, k_odd.to(store_as), mask=in_rope)


def block_sizes(rank: int, rope: int, heads: int, fp8: bool) -> tuple:
    """The kernel's constexprs (RANK, ROPE, BLOCK_R, BLOCK_P, BLOCK_H, FP8) for a launch."""
    return (rank, rope, max(triton.next_power_of_2(rank), 128 if fp8 else 1), triton.next_power_of_2(rope // 2),
            triton.next_power_of_2(max(heads, 1)), fp8)


def write_latent_entries_triton(c_kv: torch.Tensor, k_pe: torch.Tensor, q_pe: torch.Tensor,
                                norm_weight: torch.Tensor, eps: float, rotations: torch.Tensor,
                                positions: torch.Tensor, slots: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    tokens, rank = c_kv.shape
    rope = k_pe.shape[-1]
    fp8 = latent_fp8.is_fp8(cache)
    width = latent_fp8.entry_bytes(rank, rope) if fp8 else rank + rope
    if (cache.shape[-1] != width or not cache.is_contiguous() or q_pe.shape[-1] != rope
            or any(t.stride(-1) != 1 for t in (c_kv, k_pe, q_pe)) or rope % 2):
        raise ValueError(f"write_latent_entries: c_kv {tuple(c_kv.shape)}, k_pe {tuple(k_pe.shape)}, "
                         f"q_pe {tuple(q_pe.shape)}, cache {tuple(cache.shape)} {cache.dtype} do not fit")
    if tokens:
        heads = q_pe.shape[1]
        table = torch.view_as_real(rotations)  # [positions, rope / 2, 2] float32: (cos, sin) pairs
        _write_latent_kernel[(tokens,)](
            c_kv, c_kv.stride(0), k_pe, k_pe.stride(0), q_pe, q_pe.stride(0), q_pe.stride(1), heads,
            norm_weight, eps, table, positions, slots, cache, *block_sizes(rank, rope, heads, fp8), num_warps=4)
    return q_pe


def write_latent_entries(c_kv: torch.Tensor, k_pe: torch.Tensor, q_pe: torch.Tensor, norm_weight: torch.Tensor,
                         eps: float, rotations: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                         cache: torch.Tensor) -> torch.Tensor:
    """c_kv [T, rank], k_pe [T, rope], q_pe [T, H, rope] (row views of the projections' outputs
    are fine); rotations: the RotaryEmbedding's complex64 table; slots [T]; cache [blocks, page,
    entry] (the model's dtype, or uint8 in the FP8 layout). Writes the entries, returns q_pe
    rotated (in place on the kernel paths)."""
    if triton_wanted(c_kv):
        return write_latent_entries_triton(c_kv, k_pe, q_pe, norm_weight, eps, rotations, positions, slots, cache)
    if native.runs("norm", q_pe, norm_weight) and (latent_fp8.is_fp8(cache) or native.runs("norm", cache)):
        native.mla_cache_entries(c_kv, k_pe, q_pe, norm_weight, eps, rotations, positions, slots, cache)
        return q_pe
    return write_latent_entries_ref(c_kv, k_pe, q_pe, norm_weight, eps, rotations, positions, slots, cache)
