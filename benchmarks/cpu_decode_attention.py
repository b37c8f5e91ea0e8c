"""The compiled CPU decode-attention kernel (kernels/csrc/mla_decode_cpu.cpp) against the machine's
read bandwidth, measured in the same run: a decode step's worth of sequences over a latent cache
whose blocks are shuffled through a pool twice the size needed (as a serving cache is), several
layers so that the blocks are cold, and as the peer a plain multi-threaded sum over a contiguous
tensor of the same size (the most this machine reads per second). Also prints the kernel with
the cache resident in L2 (every sequence on the same few blocks): the compute-only time.

    .venv/bin/python benchmarks/cpu_decode_attention.py --heads 8 --rows 256
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

# This folder holds kernels.py, which would shadow the kernels package: the repo root goes first.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from kernels import native

PAGE, RANK, ROPE = 64, 512, 64


def median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--rows", type=int, default=256, help="decoding sequences")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if native.library() is None:
        sys.exit("the CPU kernels are not built (no C++ compiler, or MLASERVE_NATIVE=0)")
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    lens = [rng.randint(32, 256) + rng.randint(0, 128) for _ in range(args.rows)]
    pages = [-(-n // PAGE) for n in lens]
    pool = 2 * sum(pages)
    caches, tables = [], []
    for _ in range(args.layers):
        caches.append(torch.randn(pool, PAGE, RANK + ROPE).bfloat16())
        order = rng.sample(range(pool), sum(pages))
        table = torch.zeros(args.rows, max(pages), dtype=torch.long)
        start = 0
        for r, n in enumerate(pages):
            table[r, :n] = torch.tensor(order[start:start + n])
            start += n
        tables.append(table)
    q_latent = torch.randn(args.rows, args.heads, RANK).bfloat16()
    q_pe = torch.randn(args.rows, args.heads, ROPE).bfloat16()
    seq = torch.arange(args.rows, dtype=torch.int32)
    kv_lens = torch.tensor(lens, dtype=torch.int32)

    def attend(tables_by_layer):
        for cache, table in zip(caches, tables_by_layer):
            native.paged_mla_decode_cpu(q_latent, q_pe, cache, table, seq, kv_lens, 0.07, max(lens))

    cold = median_time(lambda: attend(tables), args.reps) / args.layers
    same_blocks = torch.arange(max(pages)).expand(args.rows, -1).contiguous()
    hot = median_time(lambda: attend([same_blocks] * args.layers), args.reps) / args.layers
    nbytes = sum(lens) * (RANK + ROPE) * 2
    flat = torch.ones(nbytes // 4 * args.layers, dtype=torch.float32)
    read = median_time(lambda: flat.sum(), args.reps) / args.layers

    print(f"{args.rows} sequences x {sum(lens) / args.rows:.0f} tokens (32-384), {args.heads} heads, "
          f"{args.threads} threads, {nbytes / 1e6:.1f} MB of cache per layer")
    print(f"kernel, cache cold:     {cold * 1e3:6.2f} ms per layer  {nbytes / cold / 1e9:5.1f} GB/s")
    print(f"kernel, cache in L2:    {hot * 1e3:6.2f} ms per layer")
    print(f"plain read (peer):      {read * 1e3:6.2f} ms per layer  {nbytes / read / 1e9:5.1f} GB/s")
    print(f"ratio (kernel GB/s / plain read GB/s): {read / cold:.2f}")


if __name__ == "__main__":
    main()
