"""The compiled AVX-512 BF16 kernels against torch on a CPU with AVX-512 BF16 and no AMX (AMD Zen 4/5,
Intel Ice Lake and Cooper Lake): the decision of which one the CPU path runs there, for the dense
linears, the routed experts and prefill attention.

On an AMX machine the same class of CPU is emulated: the kernels' avx512 build (kernels/cpu_build.py,
compiled with AMX turned off) and torch with oneDNN capped at AVX-512 BF16 (ONEDNN_MAX_CPU_ISA, set
before torch loads). Both run in the same process, taking turns, on the same threads. Shapes are
DeepSeek-V3's linears and experts at a decode step's and a prefill chunk's row counts (widths
scaled by --scale to keep a 2-core run short).

    .venv/bin/python benchmarks/cpu_avx512_paths.py [--threads 2] [--reps 9] [--scale 4]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
# This folder holds kernels.py, which would shadow the kernels package: the repo root goes first.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.cpu_decode_attention import median_times  # noqa: E402
from kernels import cpu_build, native  # noqa: E402

# (name, K, N) of DeepSeek-V3 (hidden 7168): q_a + kv_a stacked, q_b, o_proj, a shared expert's
# gate_up and down.
LINEARS = [("qkv_a", 7168, 1536 + 576), ("q_b", 1536, 128 * 192), ("o_proj", 128 * 128, 7168),
           ("shared gate_up", 7168, 2 * 2048), ("shared down", 2048, 7168)]


def linear_rows(args) -> None:
    for name, k, n in LINEARS:
        k, n = max(32, k // args.scale // 32 * 32), max(32, n // args.scale // 32 * 32)
        w = (torch.randn(n, k) / k ** 0.5).bfloat16()
        strips = native.pack_strips(w)
        for rows in (1, 32, 128, 256, 1024):
            x = torch.randn(rows, k).bfloat16()
            fns = {"compiled": lambda x=x, s=strips: native.linear(x, s), "torch": lambda x=x, w=w: F.linear(x, w)}
            times = median_times(fns, args.reps)
            print(f"linear {name:15s} K={k:5d} N={n:5d} rows={rows:5d}: compiled {times['compiled'] * 1e3:7.3f} ms, "
                  f"torch {times['torch'] * 1e3:7.3f} ms, torch/compiled {times['torch'] / times['compiled']:.2f}")


def experts(args) -> None:
    from kernels.routed_experts import RoutedExperts

    hidden, inter, n, k = 7168 // args.scale, 2048 // args.scale, 32, 8
    hidden, inter = hidden // 64 * 64, inter // 32 * 32
    gate_up = (torch.randn(n, 2 * inter, hidden) / hidden ** 0.5).bfloat16()
    down = (torch.randn(n, hidden, inter) / inter ** 0.5).bfloat16()
    compiled = RoutedExperts(gate_up, down, 0)
    plain = RoutedExperts(gate_up, down, 0, compiled=False)
    assert compiled.compiled
    for tokens in (1, 32, 256, 1024):
        x = torch.randn(tokens, hidden).bfloat16()
        weights = torch.rand(tokens, k)
        ids = torch.stack([torch.randperm(n)[:k] for _ in range(tokens)])
        a = (x, weights, ids)
        times = median_times({"compiled": lambda a=a: compiled(*a), "torch": lambda a=a: plain(*a)}, args.reps)
        print(f"experts {n} x ({hidden} -> {inter}), top {k}, tokens={tokens:5d}: compiled "
              f"{times['compiled'] * 1e3:7.3f} ms, torch {times['torch'] * 1e3:7.3f} ms, "
              f"torch/compiled {times['torch'] / times['compiled']:.2f}")


def _prefill_times(reps: int, heads: int, nope: int, rope: int, v_dim: int, q_len: int, k_len: int) -> dict:
    from kernels.mla_attention import _torch_chunk_attention

    q = torch.randn(q_len, heads, nope + rope).bfloat16()
    k_nope = torch.randn(k_len, heads, nope).bfloat16()
    k_pe = torch.randn(k_len, rope).bfloat16()
    v = torch.randn(k_len, heads, v_dim).bfloat16()
    out = torch.empty(q_len, heads, v_dim, dtype=torch.bfloat16)
    spans = torch.tensor([[0], [q_len], [0], [k_len]])
    shared_rope = k_pe[:, None].expand(k_len, heads, rope)

    def compiled():
        native.prefill_attention(q[..., :nope], q[..., nope:], k_nope, shared_rope, v, spans, 0.07, out)

    return median_times({"compiled": compiled, "torch": lambda: _torch_chunk_attention(q, k_nope, k_pe, v, 0.07)},
                        reps)


def prefill(args) -> None:
    """The compiled kernel against the torch path the CPU takes without it (kernels/mla_attention.py)."""
    heads, nope, rope, v_dim = max(1, 128 // args.scale), 128, 64, 128  # DeepSeek-V3's head widths
    for q_len, k_len in ((64, 64), (256, 256), (1024, 1024), (256, 2048)):  # the last after a cached prefix
        times = _prefill_times(args.reps, heads, nope, rope, v_dim, q_len, k_len)
        print(f"prefill attention {heads} heads, {q_len:4d} queries over {k_len:4d} keys: compiled "
              f"{times['compiled'] * 1e3:7.3f} ms, torch {times['torch'] * 1e3:7.3f} ms, "
              f"torch/compiled {times['torch'] / times['compiled']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--scale", type=int, default=4, help="divide DeepSeek-V3's widths by this")
    ap.add_argument("--only", choices=["linear", "experts", "prefill"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MLASERVE_CPU_ISA", "avx512")
    os.environ.setdefault("MLASERVE_CPU_PREFILL", "avx512")  # opt-in there (kernels/cpu_build.py: OPT_IN)
    if "avx512" not in cpu_build.runnable_variants():
        sys.exit("this machine cannot run the avx512 build (kernels/cpu_build.py)")
    print(f"threads {args.threads}; torch's oneDNN capped at {os.environ['ONEDNN_MAX_CPU_ISA']}; the kernels' "
          f"avx512 build; median of {args.reps}, taking turns")
    if args.only in (None, "linear"):
        if native.library("linear") is None:
            sys.exit("the linear family has no avx512 code")
        linear_rows(args)
    if args.only in (None, "experts"):
        if native.library("moe") is None:
            print("experts: the moe family has no avx512 code")
        else:
            experts(args)
    if args.only in (None, "prefill"):
        if native.library("prefill") is None:
            print("prefill: the prefill family has no avx512 code")
        else:
            prefill(args)


if __name__ == "__main__":
    main()
