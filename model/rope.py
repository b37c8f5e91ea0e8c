"""YaRN rotary embedding as DeepSeek-V3 applies it: interleaved pairs (x0, x1), (x2, x3), ...

The cache stores rope keys in this interleaved layout, as the reference does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.model_config import ModelConfig
from kernels.rope import rotate


def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    y = cfg.rope
    if y is None or y.factor <= 1:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(y.beta_fast)), 0)
    high = min(math.ceil(correction_dim(y.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # Low dims (fast rotations) keep their frequency; high dims are interpolated by `factor`.
    return inv_freq / y.factor * ramp + inv_freq * (1 - ramp)


def yarn_cos_sin_scale(cfg: ModelConfig) -> float:
    """Scale on cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for V3)."""
    y = cfg.rope
    if y is None or y.factor <= 1:
        return 1.0

    def m(scale: float, ms: float) -> float:
        return 0.1 * ms * math.log(scale) + 1.0 if scale > 1 else 1.0

    return m(y.factor, y.mscale) / m(y.factor, y.mscale_all_dim) if y.mscale_all_dim else m(y.factor, 1.0)


class RotaryEmbedding(nn.Module):
    """The rotations are a (non-persistent) complex buffer, so it follows the model's `.to(device)`.
    Each interleaved pair is one complex number and rotating it one complex product: one op where
    the real-valued form takes eight (2048 tokens x 8 heads: 7.4 -> 0.86 ms on the CPU)."""

    rotations: torch.Tensor

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None, device="cpu"):
        super().__init__()
        n = max_positions or cfg.max_position_embeddings
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), yarn_inv_freq(cfg))
        scale = yarn_cos_sin_scale(cfg)
        rotations = torch.polar(torch.full_like(freqs, scale), freqs)  # scale * (cos + i sin)
        self.register_buffer("rotations", rotations.to(device), persistent=False)  # [max_pos, rope_dim // 2]

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, ..., rope_dim]; rotates each interleaved pair by its position's angle."""
        return rotate(x, self.rotations, positions)
