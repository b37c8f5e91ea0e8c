"""Paged MLA decode attention (the FlashMLA role), split over the context (flash-decoding).

Each query row t (a decode token, or one of a sequence's speculative tokens) attends, with all its
heads, over the first kv_lens[t] entries of sequence seq_of_row[t]'s latent cache, found through
its block table. Entries are [latent (512) | rope key (64)], shared by all heads:
    score = q_latent·c + q_pe·k_pe,  out = softmax(score · scale) · c   ([rows, heads, 512])
The context is cut into `num_splits` pieces, each program reduces one piece for a block of heads
(partial output and log-sum-exp), and a second kernel merges the pieces, so one long sequence
still spreads over the whole GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import latent_fp8
from kernels.backend import batch_invariant, cdiv, interpreting, triton_wanted

LOG2E = 1.4426950408889634


def paged_mla_decode_ref(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_of_row: torch.Tensor, kv_lens: torch.Tensor,
                         softmax_scale: float, max_kv_len: int, num_splits: int | None = None) -> torch.Tensor:
    """Same contract as `paged_mla_decode`, in plain torch (float32 softmax)."""
    rows, heads, rank = q_latent.shape
    page = cache.shape[1]
    n_pages = cdiv(max(max_kv_len, 1), page)
    tables = block_tables[seq_of_row][:, :n_pages]  # [rows, n_pages]
    kv = cache[tables].view(rows, n_pages * page, -1)
    kv = latent_fp8.dequantize_entries(kv, rank, torch.float32) if latent_fp8.is_fp8(cache) else kv.float()
    q = torch.cat([q_latent, q_pe], dim=-1).float()
    scores = torch.einsum("thd,tld->thl", q, kv) * softmax_scale
    valid = torch.arange(n_pages * page, device=q.device)[None, :] < kv_lens[:, None]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("thl,tld->thd", scores.softmax(-1), kv[..., :rank]).to(q_latent.dtype)


# The table width and split count change every step: one compiled variant, not one per value class.
@triton.jit(do_not_specialize=["table_stride", "num_splits"])
def _mla_decode_split_kernel(
    ql_ptr, qpe_ptr, cache_ptr, tables_ptr, seq_ptr, lens_ptr, out_ptr, part_ptr, lse_ptr,
    heads, table_stride, qk_scale_log2, num_splits,
    RANK: tl.constexpr, ROPE: tl.constexpr, PAGE: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr, RELOAD_V: tl.constexpr,
    FP8: tl.constexpr,
):
    hb = tl.program_id(0)
    row = tl.program_id(1)
    split = tl.program_id(2)
    # FP8 layout (kernels/latent_fp8.py): ENTRY bytes per token, e4m3 latents, then a float32
    # power-of-two scale per 128 of them, then the rope key in bf16.
    ENTRY: tl.constexpr = RANK + RANK // 32 + 2 * ROPE if FP8 else RANK + ROPE
    kv_len = tl.load(lens_ptr + row)
    seq = tl.load(seq_ptr + row).to(tl.int64)
    per_split = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, kv_len)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < heads
    offs_c = tl.arange(0, RANK)
    offs_r = tl.arange(0, ROPE)
    offs_g = tl.arange(0, RANK // 128)
    q_rows = row.to(tl.int64) * heads + offs_h
    q_lat = tl.load(ql_ptr + q_rows[:, None] * RANK + offs_c[None, :], mask=h_ok[:, None], other=0.0)
    q_pe = tl.load(qpe_ptr + q_rows[:, None] * ROPE + offs_r[None, :], mask=h_ok[:, None], other=0.0)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, RANK), dtype=tl.float32)
    table = tables_ptr + seq * table_stride
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        page_id = tl.load(table + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
        entry = (page_id * PAGE + offs_n % PAGE) * ENTRY
        if FP8:
            raw = tl.load(cache_ptr + entry[:, None] + offs_c[None, :], mask=n_ok[:, None], other=0)
            scale_ptr = (cache_ptr + entry + RANK).to(tl.pointer_type(tl.float32))
            # [BLOCK_N, groups] scales broadcast over their 128 columns in registers: a per-column
            # gather of them would be 4 bytes per value through the load pipeline.
            scale = tl.load(scale_ptr[:, None] + offs_g[None, :], mask=n_ok[:, None], other=0.0)
            values = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32).reshape(BLOCK_N, RANK // 128, 128)
            c = (values * scale[:, :, None]).reshape(BLOCK_N, RANK).to(q_lat.dtype)
            rope_ptr = (cache_ptr + entry + RANK + RANK // 32).to(tl.pointer_type(tl.bfloat16))
            k_pe = tl.load(rope_ptr[:, None] + offs_r[None, :], mask=n_ok[:, None], other=0.0).to(q_pe.dtype)
        else:
            c = tl.load(cache_ptr + entry[:, None] + offs_c[None, :], mask=n_ok[:, None], other=0.0)
            k_pe = tl.load(cache_ptr + entry[:, None] + RANK + offs_r[None, :], mask=n_ok[:, None], other=0.0)
        if UPCAST_DOT:  # also float32 caches: full-precision products, not TF32
            s = tl.dot(q_lat.to(tl.float32), tl.trans(c.to(tl.float32)), input_precision="ieee")
            s += tl.dot(q_pe.to(tl.float32), tl.trans(k_pe.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q_lat, tl.trans(c)) + tl.dot(q_pe, tl.trans(k_pe))
        s = tl.where(n_ok[None, :], s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if RELOAD_V and not FP8:
            # A second load of the same rows (an L1/L2 hit) instead of re-laying out the tile that
            # fed the score product: lets the compiler feed both products from shared memory.
            c = tl.load(cache_ptr + entry[:, None] + offs_c[None, :], mask=n_ok[:, None], other=0.0)
        if UPCAST_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype).to(tl.float32), c.to(tl.float32),
                                                input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
        m_i = m_new

    if SINGLE_SPLIT:
        out = acc / l_i[:, None]
        tl.store(out_ptr + q_rows[:, None] * RANK + offs_c[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=h_ok[:, None])
    else:
        # An empty split (short context) leaves l_i = 0: its log-sum-exp is -inf and it weighs nothing.
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        part_rows = q_rows * num_splits + split
        tl.store(part_ptr + part_rows[:, None] * RANK + offs_c[None, :], acc / safe_l[:, None], mask=h_ok[:, None])
        tl.store(lse_ptr + part_rows, tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf")), mask=h_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _mla_decode_merge_kernel(part_ptr, lse_ptr, out_ptr, num_splits, RANK: tl.constexpr,
                             SPLITS_POW2: tl.constexpr):
    qrow = tl.program_id(0).to(tl.int64)  # row * heads + head
    offs_s = tl.arange(0, SPLITS_POW2)
    s_ok = offs_s < num_splits
    lse = tl.load(lse_ptr + qrow * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    offs_c = tl.arange(0, RANK)
    parts = tl.load(part_ptr + (qrow * num_splits + offs_s)[:, None] * RANK + offs_c[None, :],
                    mask=s_ok[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0)
    tl.store(out_ptr + qrow * RANK + offs_c, out.to(out_ptr.dtype.element_ty))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, so that tests see several splits


def choose_num_splits(rows: int, head_blocks: int, max_kv_len: int, device: torch.device,
                      min_tokens_per_split: int = 256) -> int:
    """About two waves of programs over the GPU, and at least two splits of a long context (on
    the H100 two beat one and three at batch 64 and 256: 949 vs 900 GB/s, 967 vs 925 GB/s at 4K),
    but no split shorter than `min_tokens_per_split` (each costs a partial output written and
    read back)."""
    programs = max(rows * head_blocks, 1)
    want = max(round(2 * _num_sms(device) / programs), 2 if max_kv_len >= 2048 else 1)
    return max(1, min(want, cdiv(max_kv_len, min_tokens_per_split), 64))


def decode_tile(heads: int, block_h: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_N, num_warps, num_stages) on a GPU: 64 heads x 64 tokens per program with
    8 warps beat 16 and 32 heads and 32-token tiles on the H100; 3 stages beat 2 by 2-10%."""
    block_h = block_h or min(64, max(16, triton.next_power_of_2(heads)))
    return block_h, 64, 8 if block_h >= 64 else 4, 3


def paged_mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_of_row: torch.Tensor, kv_lens: torch.Tensor,
                     softmax_scale: float, max_kv_len: int, num_splits: int | None = None,
                     block_h: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, reload_v: bool = True) -> torch.Tensor:
    """q_latent [rows, H, 512], q_pe [rows, H, 64], cache [num_blocks, page, 576],
    block_tables [seqs, max_pages], seq_of_row and kv_lens [rows] -> [rows, H, 512].
    `max_kv_len` (host side) bounds kv_lens; it sizes the splits without a device sync."""
    if not triton_wanted(q_latent):
        return paged_mla_decode_ref(q_latent, q_pe, cache, block_tables, seq_of_row, kv_lens, softmax_scale,
                                    max_kv_len)
    rows, heads, rank = q_latent.shape
    rope = q_pe.shape[-1]
    page = cache.shape[1]
    q_latent, q_pe = q_latent.contiguous(), q_pe.contiguous()
    out = torch.empty(q_latent.shape, dtype=q_latent.dtype, device=q_latent.device)  # contiguous, whatever q was
    if rows == 0:
        return out
    block_h, tile_n, tile_warps, tile_stages = decode_tile(heads, block_h)
    block_n, num_warps, num_stages = block_n or tile_n, num_warps or tile_warps, num_stages or tile_stages
    head_blocks = cdiv(heads, block_h)
    # Unsplit in the batch-invariant mode: the split count follows the batch's rows and longest
    # context, and each split changes the order in which a row's context is summed.
    splits = num_splits or (1 if batch_invariant() else choose_num_splits(rows, head_blocks, max_kv_len,
                                                                          q_latent.device))
    if splits > 1:
        part = torch.empty(rows * heads * splits, rank, dtype=torch.float32, device=q_latent.device)
        lse = torch.empty(rows * heads * splits, dtype=torch.float32, device=q_latent.device)
    else:
        part = lse = out  # not touched
    _mla_decode_split_kernel[(head_blocks, rows, splits)](
        q_latent, q_pe, cache, block_tables, seq_of_row, kv_lens, out, part, lse,
        heads, block_tables.stride(0), softmax_scale * LOG2E, splits,
        RANK=rank, ROPE=rope, PAGE=page, SINGLE_SPLIT=splits == 1, BLOCK_H=block_h, BLOCK_N=block_n,
        UPCAST_DOT=interpreting() or q_latent.dtype == torch.float32, RELOAD_V=reload_v, FP8=latent_fp8.is_fp8(cache),
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _mla_decode_merge_kernel[(rows * heads,)](part, lse, out, splits, RANK=rank,
                                                  SPLITS_POW2=triton.next_power_of_2(splits), num_warps=4)
    return out


def decode_bytes(rows: int, heads: int, kv_lens_total: int, entry: int = 576, elem: int = 2,
                 cache_entry_bytes: int | None = None) -> int:
    """Fewest bytes a decode step must move: every cache entry once (`cache_entry_bytes` each, by
    default entry * elem; 656 in the FP8 layout), queries in, outputs out."""
    per_entry = entry * elem if cache_entry_bytes is None else cache_entry_bytes
    return kv_lens_total * per_entry + rows * heads * (entry + 512) * elem


