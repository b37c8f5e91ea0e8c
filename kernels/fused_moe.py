"""Fused FP8 mixture of experts for one expert-parallel rank.

The (token, choice) pairs routed to this rank's experts are sorted by expert and each expert's
run is padded to a multiple of BLOCK_M, so every M tile of the grouped GEMM belongs to one expert
(`align_by_expert`). Then: one grouped GEMM launch for gate+up over all experts, SiLU(gate)·up
fused with its FP8 quantization, one grouped GEMM launch for down that also applies the router
weight, and a sum over each token's choices. Weights are the checkpoint's FP8 blocks with their
128×128 `weight_scale_inv`; activations are quantized per token per 128 channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.backend import batch_invariant, cdiv, triton_wanted
from kernels.fp8_gemm import fp8_gemm_ref
from kernels.quant import act_quant, act_quant_ref, silu_mul_quant, silu_mul_quant_ref


@dataclass
class ExpertAlignment:
    sorted_pairs: torch.Tensor  # [capacity] flat (token * top_k + choice) ids; padding = num_pairs
    block_expert: torch.Tensor  # [capacity // block_m] local expert of each M tile; num_local = unused
    num_pairs: int
    block_m: int


def alignment_capacity(num_pairs: int, num_local: int, block_m: int) -> int:
    """Rows of the sorted layout: its worst case (every expert's run padded by block_m - 1), so
    that no host round trip is needed to size the launch; tiles past the real ones are unused."""
    return cdiv(num_pairs + num_local * (block_m - 1), block_m) * block_m


def align_by_expert_ref(topk_ids: torch.Tensor, first_expert: int, num_local: int, block_m: int) -> ExpertAlignment:
    """Same contract as `align_by_expert`, in torch (30 operators, each a launch on a GPU); within
    an expert the pairs keep their order."""
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    local = topk_ids.flatten() - first_expert
    key = torch.where((local >= 0) & (local < num_local), local, num_local)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    counts = torch.bincount(key, minlength=num_local + 1)[:num_local]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    capacity = alignment_capacity(num_pairs, num_local, block_m)
    on_rank = sorted_key < num_local
    e = sorted_key.clamp(max=num_local - 1)
    rank_in_expert = torch.arange(num_pairs, device=device) - start[e]
    dest = torch.where(on_rank, padded_start[e] + rank_in_expert, capacity)  # off-rank pairs: a spare slot
    sorted_pairs = torch.full((capacity + 1,), num_pairs, dtype=torch.int64, device=device)
    sorted_pairs.scatter_(0, dest, order)
    tile_start = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, tile_start, right=True)  # == num_local past the end
    return ExpertAlignment(sorted_pairs[:capacity], block_expert, num_pairs, block_m)


@triton.jit(do_not_specialize=["num_pairs", "num_tiles"])
def _expert_runs_kernel(ids_ptr, num_pairs, first_expert, num_local, run_start_ptr, cursor_ptr, block_expert_ptr,
                        num_tiles, BLOCK_M: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr,
                        TILE_BLOCK: tl.constexpr):
    """One program: each local expert's pair count, its run padded to BLOCK_M, where the run
    starts, and the expert of every M tile (num_local past the last run)."""
    counts = tl.zeros([BINS], dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK):
        i = p0 + tl.arange(0, BLOCK)
        local = tl.load(ids_ptr + i, mask=i < num_pairs, other=-1).to(tl.int32) - first_expert
        # Pairs of other ranks' experts and the block's tail count in bin num_local, never read.
        counts += tl.histogram(tl.where((i < num_pairs) & (local >= 0) & (local < num_local), local, num_local),
                               BINS)
    bins = tl.arange(0, BINS)
    padded = tl.where(bins < num_local, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    run_end = tl.cumsum(padded, 0)
    tl.store(run_start_ptr + bins, run_end - padded)
    tl.store(cursor_ptr + bins, tl.zeros([BINS], dtype=tl.int32))
    for t0 in range(0, num_tiles, TILE_BLOCK):
        tile = t0 + tl.arange(0, TILE_BLOCK)
        # The runs that end at or before the tile's first row: the tile's expert (searchsorted).
        ended = (run_end[None, :] <= (tile * BLOCK_M)[:, None]) & (bins[None, :] < num_local)
        tl.store(block_expert_ptr + tile, tl.sum(ended.to(tl.int32), 1), mask=tile < num_tiles)


@triton.jit(do_not_specialize=["num_pairs"])
def _place_pairs_kernel(ids_ptr, num_pairs, first_expert, num_local, run_start_ptr, cursor_ptr, sorted_pairs_ptr,
                        BLOCK: tl.constexpr):
    """Each pair on this rank takes the next free row of its expert's run."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    local = tl.load(ids_ptr + i, mask=i < num_pairs, other=-1).to(tl.int32) - first_expert
    mine = (i < num_pairs) & (local >= 0) & (local < num_local)
    row = tl.atomic_add(cursor_ptr + local, 1, mask=mine) + tl.load(run_start_ptr + local, mask=mine, other=0)
    tl.store(sorted_pairs_ptr + row, i.to(tl.int64), mask=mine)


PLACE_BLOCK = 1024
RUNS_WARPS = 8  # with 4, the sm_90 build of 257 bins keeps 8 bytes on the stack


def tile_block(bins: int) -> int:
    """Tiles per step of the runs kernel's tile-expert search: a [tiles, bins] comparison of
    about 4K elements."""
    return max(16, 4096 // bins)


def align_by_expert(topk_ids: torch.Tensor, first_expert: int, num_local: int, block_m: int) -> ExpertAlignment:
    """topk_ids [T, k] (global expert ids) -> this rank's pairs laid out expert by expert, each
    run padded to a multiple of block_m: three launches (the padding fill, the runs, the
    placement) where Triton runs, sync-free. Within an expert the pairs come in the order their
    atomic increments land, which the grouped GEMMs do not depend on: each pair's rows are
    computed and written on their own."""
    if not triton_wanted(topk_ids):
        return align_by_expert_ref(topk_ids, first_expert, num_local, block_m)
    num_pairs = topk_ids.numel()
    ids = topk_ids.reshape(-1)
    capacity = alignment_capacity(num_pairs, num_local, block_m)
    num_tiles = capacity // block_m
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int64, device=ids.device)
    block_expert = torch.empty(num_tiles, dtype=torch.int64, device=ids.device)
    bins = triton.next_power_of_2(num_local + 1)
    run_start = torch.empty(bins, dtype=torch.int32, device=ids.device)
    cursor = torch.empty(bins, dtype=torch.int32, device=ids.device)
    _expert_runs_kernel[(1,)](ids, num_pairs, first_expert, num_local, run_start, cursor, block_expert, num_tiles,
                              BLOCK_M=block_m, BINS=bins, BLOCK=PLACE_BLOCK, TILE_BLOCK=tile_block(bins),
                              num_warps=RUNS_WARPS)
    if num_pairs:
        _place_pairs_kernel[(cdiv(num_pairs, PLACE_BLOCK),)](ids, num_pairs, first_expert, num_local, run_start,
                                                             cursor, sorted_pairs, BLOCK=PLACE_BLOCK, num_warps=4)
    return ExpertAlignment(sorted_pairs, block_expert, num_pairs, block_m)


@triton.jit(do_not_specialize=["num_pairs"])  # changes every step: one compiled variant
def _grouped_fp8_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, pairs_ptr, block_expert_ptr, weight_ptr,
    N, K, num_pairs, num_local, top_k,
    A_ROW_IS_TOKEN: tl.constexpr, APPLY_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    BLOCK_K: tl.constexpr = 128
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_local:
        return
    pairs = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    m_ok = pairs < num_pairs
    # gate/up reads the token's hidden state; down reads the pair's own intermediate row.
    a_rows = pairs // top_k if A_ROW_IS_TOKEN else pairs
    a_rows = tl.where(m_ok, a_rows, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_groups = tl.cdiv(K, BLOCK_K)
    n_groups = tl.cdiv(N, BLOCK_K)
    e64 = expert.to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + e64 * N * K + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
    as_ptrs = as_ptr + a_rows * k_groups
    ONE_B_SCALE: tl.constexpr = BLOCK_N <= BLOCK_K  # the tile lies in one weight-block column
    if ONE_B_SCALE:
        bs_ptrs = bs_ptr + e64 * n_groups * k_groups + (pid_n * BLOCK_N // BLOCK_K) * k_groups
    else:
        bs_ptrs = bs_ptr + e64 * n_groups * k_groups + (offs_n // BLOCK_K) * k_groups
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_groups):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs + kb * BLOCK_K, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs + kb * BLOCK_K, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb, mask=m_ok, other=0.0)
        if ONE_B_SCALE:
            acc += tl.dot(a, b) * (a_s * tl.load(bs_ptrs + kb))[:, None]
        else:
            b_s = tl.load(bs_ptrs + kb, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    if APPLY_WEIGHT:
        w = tl.load(weight_ptr + pairs, mask=m_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + tl.where(m_ok, pairs, 0).to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _moe_tiles(num_tokens: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): small M tiles while few tokens reach each expert."""
    if device.type != "cuda":
        return 16, 128, 4, 2
    if num_tokens <= 64 or batch_invariant():  # the mode's one tile (kernels/batch_invariant.py)
        return 16, 128, 4, 4
    if num_tokens <= 512:
        return 32, 128, 4, 4
    return 64, 128, 4, 3


def _grouped_gemm(a, a_scale, w, w_scale, out, align: ExpertAlignment, top_k: int, a_row_is_token: bool,
                  weights: torch.Tensor | None, block_n: int, num_warps: int, num_stages: int) -> None:
    n, k = w.shape[1], w.shape[2]
    grid = (align.block_expert.numel(), cdiv(n, block_n))
    _grouped_fp8_gemm_kernel[grid](
        a, a_scale, w, w_scale, out, align.sorted_pairs, align.block_expert,
        weights if weights is not None else a_scale,
        n, k, align.num_pairs, w.shape[0], top_k,
        A_ROW_IS_TOKEN=a_row_is_token, APPLY_WEIGHT=weights is not None,
        BLOCK_M=align.block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
    )


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor, down: torch.Tensor,
              down_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              first_expert: int = 0) -> torch.Tensor:
    """x [T, hidden]; gate_up [E_local, 2I, hidden] e4m3 (+ scales [E_local, 2I/128, hidden/128]);
    down [E_local, hidden, I] e4m3 (+ scales); topk_ids/weights [T, k] with global expert ids.
    Returns Σ_k w·expert(x) over the choices that fall on experts [first_expert, first_expert + E_local)."""
    if not triton_wanted(x):
        return fused_moe_ref(x, gate_up, gate_up_scale, down, down_scale, topk_weights, topk_ids, first_expert)
    t, hidden = x.shape
    top_k = topk_ids.shape[1]
    inter = down.shape[2]
    block_m, block_n, warps, stages = _moe_tiles(t, x.device)
    align = align_by_expert(topk_ids, first_expert, gate_up.shape[0], block_m)
    xq, xs = act_quant(x)
    h1 = torch.empty(t * top_k, 2 * inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(xq, xs, gate_up, gate_up_scale, h1, align, top_k, True, None, block_n, warps, stages)
    # Rows of pairs routed off this rank hold garbage here; the down GEMM never reads them.
    hq, hs = silu_mul_quant(h1)
    h2 = torch.zeros(t * top_k, hidden, dtype=x.dtype, device=x.device)
    _grouped_gemm(hq, hs, down, down_scale, h2, align, top_k, False, topk_weights.flatten().float().contiguous(),
                  block_n, warps, stages)
    return h2.view(t, top_k, hidden).sum(1)


def fused_moe_ref(x, gate_up, gate_up_scale, down, down_scale, topk_weights, topk_ids, first_expert=0):
    """The same computation expert by expert in torch, with the same FP8 activation quantization."""
    t, hidden = x.shape
    top_k = topk_ids.shape[1]
    out = torch.zeros(t * top_k, hidden, dtype=torch.float32, device=x.device)
    local = topk_ids.flatten() - first_expert
    xq, xs = act_quant_ref(x)
    for e in range(gate_up.shape[0]):
        pairs = (local == e).nonzero().squeeze(1)
        if pairs.numel() == 0:
            continue
        tokens = pairs // top_k
        h = fp8_gemm_ref(xq[tokens], xs[tokens], gate_up[e], gate_up_scale[e], x.dtype)
        hq, hs = silu_mul_quant_ref(h)
        y = fp8_gemm_ref(hq, hs, down[e], down_scale[e], torch.float32)
        out[pairs] = y * topk_weights.flatten()[pairs].float()[:, None]
    return out.to(x.dtype).view(t, top_k, hidden).sum(1)
