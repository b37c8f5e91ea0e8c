"""The rope rotation of DeepSeek-V3's interleaved pairs (x0, x1), (x2, x3), ...: each pair one
complex number times its position's rotation. The table of rotations (YaRN) is the model's
(model/rope.py); the cache write (kernels/cache_write.py) and the model's queries both rotate here."""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, rotations: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [T, ..., rope_dim] with each interleaved pair times rotations[positions[t]] (complex)."""
    shape = [x.shape[0]] + [1] * (x.dim() - 2) + [x.shape[-1] // 2]
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    rotated = pairs * rotations[positions].view(shape)
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)
