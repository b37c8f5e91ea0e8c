"""The FP8 latent cache entry (`kv_cache_dtype="fp8"`): FlashMLA's FP8 layout for MLA.

Per token, as raw bytes (656 for DeepSeek-V3, against 1152 in bf16):
    [rank e4m3 latent values | rank / 128 float32 scales | rope bf16 rope-key values]
Each 128 latent values share a power-of-two scale, the smallest that keeps their largest
magnitude within e4m3's 448, so dequantizing (value * scale) is exact in bf16. The rope key stays
bf16: rotated position information is what the scores are least tolerant of rounding in.

A cache in this format is a uint8 tensor [num_blocks, block_size, entry_bytes]; readers tell it
from a bf16/float32 cache by its dtype and take rank and rope from their queries' widths.
"""

from __future__ import annotations

import torch

GROUP = 128  # latent values per scale
E4M3_MAX = 448.0
# Smallest scale: a group whose largest magnitude is under this * 448 is stored as if it were this
# large (an all-zero group needs some scale).
_MIN_SCALE = 2.0 ** -40


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.uint8


def entry_bytes(rank: int, rope: int) -> int:
    check_rank(rank)
    return rank + 4 * (rank // GROUP) + 2 * rope


def check_rank(rank: int) -> None:
    if rank % GROUP:
        raise ValueError(f"the fp8 latent cache needs kv_lora_rank a multiple of {GROUP}, got {rank}")


def quantize_entries(latent: torch.Tensor, rope_key: torch.Tensor) -> torch.Tensor:
    """latent [T, rank], rope_key [T, rope] (any float dtype) -> [T, entry_bytes] uint8."""
    t, rank = latent.shape
    check_rank(rank)
    groups = latent.float().view(t, rank // GROUP, GROUP)
    amax = groups.abs().amax(-1, keepdim=True)
    # The smallest power of two s with amax / s <= 448: frexp gives amax / 448 = m * 2^e with m in
    # [0.5, 1), so s = 2^e, or 2^(e - 1) when m is exactly 0.5.
    mant, exp = torch.frexp((amax / E4M3_MAX).clamp_min(_MIN_SCALE))
    scale = torch.ldexp(torch.ones_like(mant), exp - (mant == 0.5).to(exp.dtype))
    values = (groups / scale).to(torch.float8_e4m3fn).view(torch.uint8).view(t, rank)
    out = torch.empty(t, entry_bytes(rank, rope_key.shape[-1]), dtype=torch.uint8, device=latent.device)
    out[:, :rank] = values
    out[:, rank: rank + 4 * (rank // GROUP)] = scale.view(t, -1).view(torch.uint8)
    out[:, rank + 4 * (rank // GROUP):] = rope_key.to(torch.bfloat16).contiguous().view(torch.uint8)
    return out


def dequantize_entries(raw: torch.Tensor, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """raw [..., entry_bytes] uint8 -> [..., rank + rope] in `dtype`."""
    lead = raw.shape[:-1]
    n_scales = rank // GROUP
    rope = (raw.shape[-1] - rank - 4 * n_scales) // 2
    flat = raw.reshape(-1, raw.shape[-1])
    values = flat[:, :rank].contiguous().view(torch.float8_e4m3fn).float().view(-1, n_scales, GROUP)
    scale = flat[:, rank: rank + 4 * n_scales].contiguous().view(torch.float32).view(-1, n_scales, 1)
    rope_key = flat[:, rank + 4 * n_scales:].contiguous().view(torch.bfloat16)
    out = torch.cat([(values * scale).view(-1, rank).to(dtype), rope_key.to(dtype)], dim=-1)
    return out.view(*lead, rank + rope)
