"""The compiled CPU decode-attention kernel (kernels/csrc/mla_decode_cpu.cpp) against the machine's
read bandwidth, measured in the same run: a decode step's worth of sequences over a latent cache
whose blocks are shuffled through a pool twice the size needed (as a serving cache is), several
layers so that the blocks are cold, and as the peer a plain multi-threaded sum over a contiguous
tensor of the same size (the most this machine reads per second). Also prints the kernel with
the cache resident in L2 (every sequence on the same few blocks): the compute-only time. Both
cache formats run on the same values, interleaved: bf16 (1152 bytes a token) and the FP8 layout
of kernels/latent_fp8.py (656 bytes, dequantized in the kernel).

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

from kernels import latent_fp8, native

PAGE, RANK, ROPE = 64, 512, 64


def median_times(fns: dict, reps: int) -> dict:
    """Each function's median time, the functions taking turns so that a slow spell of the
    machine falls on all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: sorted(ts)[reps // 2] for name, ts in times.items()}


def use_compiled_kernels(threads: int) -> None:
    """Exits unless the CPU kernels are built; runs torch and them on `threads` threads."""
    if native.library() is None:
        sys.exit("the CPU kernels are not built (no C++ compiler, or MLASERVE_NATIVE=0)")
    torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--rows", type=int, default=256, help="decoding sequences")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    use_compiled_kernels(args.threads)
    rng = random.Random(0)
    lens = [rng.randint(32, 256) + rng.randint(0, 128) for _ in range(args.rows)]
    pages = [-(-n // PAGE) for n in lens]
    pool = 2 * sum(pages)
    caches = {"bf16": [], "fp8": []}
    tables = []
    for _ in range(args.layers):
        latent = torch.randn(pool * PAGE, RANK + ROPE).bfloat16()
        caches["bf16"].append(latent.view(pool, PAGE, -1))
        caches["fp8"].append(latent_fp8.quantize_entries(latent[:, :RANK], latent[:, RANK:]).view(pool, PAGE, -1))
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

    def attend(fmt, tables_by_layer):
        for cache, table in zip(caches[fmt], tables_by_layer):
            native.paged_mla_decode_cpu(q_latent, q_pe, cache, table, seq, kv_lens, 0.07, max(lens))

    same_blocks = [torch.arange(max(pages)).expand(args.rows, -1).contiguous()] * args.layers
    entry_bytes = {"bf16": (RANK + ROPE) * 2, "fp8": latent_fp8.entry_bytes(RANK, ROPE)}
    nbytes = sum(lens) * entry_bytes["bf16"]
    flat = torch.ones(nbytes // 4 * args.layers, dtype=torch.float32)
    fns = {"read": lambda: flat.sum()}
    for fmt in caches:
        fns[fmt + " cold"] = lambda fmt=fmt: attend(fmt, tables)
        fns[fmt + " hot"] = lambda fmt=fmt: attend(fmt, same_blocks)
    t = {name: v / args.layers for name, v in median_times(fns, args.reps).items()}
    read_rate = nbytes / t["read"]

    print(f"{args.rows} sequences x {sum(lens) / args.rows:.0f} tokens (32-384), {args.heads} heads, "
          f"{args.threads} threads, {nbytes / 1e6:.1f} MB of bf16 cache per layer")
    print(f"plain read (peer):      {t['read'] * 1e3:6.2f} ms per layer  {read_rate / 1e9:5.1f} GB/s")
    for fmt in caches:
        cold = t[fmt + " cold"]
        rate = sum(lens) * entry_bytes[fmt] / cold
        print(f"kernel, {fmt} cache cold: {cold * 1e3:6.2f} ms per layer  {rate / 1e9:5.1f} GB/s of its "
              f"{entry_bytes[fmt]}-byte entries = {rate / read_rate:.2f} of the plain read; "
              f"in L2: {t[fmt + ' hot'] * 1e3:.2f} ms")
    print(f"fp8 / bf16 time, cache cold: {t['fp8 cold'] / t['bf16 cold']:.2f}; in L2: "
          f"{t['fp8 hot'] / t['bf16 hot']:.2f}")


if __name__ == "__main__":
    main()
