"""MLA's cache write on the CPU (kernels/cache_write.py): the compiled pass (norm of the latent,
rope of the key and the queries, the store, quantized for an FP8 cache) against the torch
reference of the same operation, measured in the same run, for a bf16 and an FP8 cache, at a
decode step's and a prefill chunk's token counts, DeepSeek-V3's widths (512 + 64; the heads'
count is a flag).

    .venv/bin/python benchmarks/cpu_cache_write.py [--heads 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# This folder holds kernels.py, which would shadow the kernels package: the repo root goes first.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from benchmarks.cpu_decode_attention import median_times, use_compiled_kernels
from kernels import latent_fp8
from kernels.cache_write import write_latent_entries, write_latent_entries_ref

RANK, ROPE, PAGE = 512, 64, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=21)
    args = ap.parse_args()
    use_compiled_kernels(args.threads)
    torch.manual_seed(0)
    rotations = torch.polar(torch.ones(8192, ROPE // 2), torch.rand(8192, ROPE // 2) * 6.28)
    weight = torch.rand(RANK).bfloat16() + 0.5
    print(f"threads {args.threads}, heads {args.heads}; median of {args.reps}, the two taking turns")
    for tokens in (256, 2048):
        kv = torch.randn(tokens, 1536 + RANK + ROPE).bfloat16()  # as the stacked q_a + kv_a output
        c_kv, k_pe = kv[:, 1536: 1536 + RANK], kv[:, 1536 + RANK:]
        q_pe = torch.randn(tokens, args.heads, 128 + ROPE).bfloat16()[..., 128:]
        positions = torch.randint(0, 8192, (tokens,))
        blocks = 4 * -(-tokens // PAGE)
        slots = torch.randperm(blocks * PAGE)[:tokens]
        for fp8 in (False, True):
            width = latent_fp8.entry_bytes(RANK, ROPE) if fp8 else RANK + ROPE
            cache = torch.zeros(blocks, PAGE, width, dtype=torch.uint8 if fp8 else torch.bfloat16)
            args_ = (c_kv, k_pe, q_pe, weight, 1e-6, rotations, positions, slots, cache)
            times = median_times({"compiled": lambda a=args_: write_latent_entries(*a),
                                  "torch": lambda a=args_: write_latent_entries_ref(*a)}, args.reps)
            print(f"{tokens:5d} tokens, {'fp8 ' if fp8 else 'bf16'} cache: compiled {times['compiled'] * 1e3:.3f} ms, "
                  f"torch reference {times['torch'] * 1e3:.3f} ms: {times['torch'] / times['compiled']:.1f}x")


if __name__ == "__main__":
    main()
