"""The physical latent cache a worker holds: per layer, [num_blocks, block_size, kv_entry_dim].

Entry layout per token: kv_lora_rank normalized latent values, then qk_rope_head_dim rope keys.
"""

from __future__ import annotations

import torch


class LatentCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, entry_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.entry_dim = entry_dim
        self.data = torch.zeros(num_layers, num_blocks, block_size, entry_dim, dtype=dtype, device=device)

    def layer(self, i: int) -> torch.Tensor:
        """Layer i's cache, [num_blocks, block_size, entry_dim] (a view)."""
        return self.data[i]

    @staticmethod
    def bytes_per_token(num_layers: int, entry_dim: int, dtype: torch.dtype) -> int:
        return num_layers * entry_dim * torch.empty((), dtype=dtype).element_size()
