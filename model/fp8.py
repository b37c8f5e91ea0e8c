"""The checkpoint's FP8 weight format: e4m3 values with one float32 scale per 128x128 block.

dequantized[i, j] = fp8[i, j] * weight_scale_inv[i // 128, j // 128]; edge blocks are partial.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def _padded_blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[out, in] -> [out_blocks, b0, in_blocks, b1], zero-padded at the edges."""
    out_f, in_f = w.shape
    b0, b1 = block
    ob, ib = -(-out_f // b0), -(-in_f // b1)
    padded = w.new_zeros(ob * b0, ib * b1)
    padded[:out_f, :in_f] = w
    return padded.view(ob, b0, ib, b1)


def quantize_weight(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (fp8 weight [out, in], float32 weight_scale_inv [ceil(out/b0), ceil(in/b1)])."""
    out_f, in_f = w.shape
    blocks = _padded_blocks(w.float(), block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(blocks.shape[0] * block[0], blocks.shape[2] * block[1])[:out_f, :in_f].contiguous()
    return q, scale_inv.contiguous()


def dequantize_weight(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128), dtype=torch.float32
) -> torch.Tensor:
    out_f, in_f = q.shape
    blocks = _padded_blocks(q.float(), block)
    w = blocks * scale_inv.float()[:, None, :, None]
    return w.view(blocks.shape[0] * block[0], blocks.shape[2] * block[1])[:out_f, :in_f].to(dtype)
