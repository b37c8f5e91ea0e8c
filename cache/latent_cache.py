"""The physical latent cache a worker holds: per layer, [num_blocks, block_size, row width].

Entry layout per token: kv_lora_rank normalized latent values, then qk_rope_head_dim rope keys, in
the model's dtype (row width kv_lora_rank + rope); or, with kv_cache_dtype "fp8", as the raw bytes
of kernels/latent_fp8.py's FP8 layout (uint8, 656 bytes a token for DeepSeek-V3).
"""

from __future__ import annotations

import torch

from kernels import latent_fp8


class LatentCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, rank: int, rope: int,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", fp8: bool = False):
        self.block_size = block_size
        self.num_blocks = num_blocks
        width = latent_fp8.entry_bytes(rank, rope) if fp8 else rank + rope
        self.data = torch.zeros(num_layers, num_blocks, block_size, width, dtype=torch.uint8 if fp8 else dtype,
                                device=device)

    def layer(self, i: int) -> torch.Tensor:
        """Layer i's cache, [num_blocks, block_size, row width] (a view)."""
        return self.data[i]

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Block dst[i] takes block src[i]'s entries in every layer (no block is both)."""
        device = self.data.device
        self.data[:, torch.tensor(dst, device=device)] = self.data[:, torch.tensor(src, device=device)]

    @staticmethod
    def bytes_per_token(num_layers: int, rank: int, rope: int, dtype: torch.dtype, fp8: bool = False) -> int:
        if fp8:
            return num_layers * latent_fp8.entry_bytes(rank, rope)
        return num_layers * (rank + rope) * torch.empty((), dtype=dtype).element_size()
