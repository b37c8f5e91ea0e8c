"""Kernel speed on the current GPU, next to the device's own measured ceilings.

Ceilings, measured in the same run: a large device-to-device copy (bytes read + written per
second), a large bf16 matmul and a large FP8 matmul (torch._scaled_mm) in TFLOP/s. Each kernel
runs on DeepSeek-V3's real shapes (hidden 7168, 128 heads, kv_lora_rank 512 + rope 64, 256
experts top-8, moe_intermediate 2048) and reports achieved GB/s (fewest bytes it must move) or
TFLOP/s and the fraction of the matching ceiling. Inputs are random (never zeros); where one set
of inputs would fit in L2, several sets are rotated.

    python benchmarks/kernels.py [--quick] [--json OUT.json] [--sweep] [--only mla|quant|gemm|moe|write|norm|router]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# This file's name would shadow the kernels package: the repo root goes first.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from kernels import latent_fp8
from kernels.cache_write import write_latent_entries, write_latent_entries_ref
from kernels.fp8_gemm import fp8_gemm
from kernels.fused_moe import fused_moe
from kernels.mla_decode import choose_num_splits, decode_bytes, paged_mla_decode
from kernels.moe_router import select_experts, select_experts_ref
from kernels.quant import FP8, act_quant
from kernels.rms_norm import rms_norm, rms_norm_ref

HIDDEN, HEADS, RANK, ROPE, PAGE = 7168, 128, 512, 64, 64
EXPERTS, TOP_K, MOE_INTER = 256, 8, 2048
# (name, N, K) of DeepSeek-V3's FP8 linears
GEMM_SHAPES = [("q_a_proj", 1536, 7168), ("q_b_proj", 24576, 1536), ("kv_a_proj_with_mqa", 576, 7168),
               ("q_a + kv_a stacked (as the model runs them)", 2112, 7168),
               ("o_proj", 7168, 16384), ("dense gate_up", 36864, 7168), ("dense down_proj", 7168, 18432)]


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_ms(fn, rep: int = 100) -> float:
    """Device time per call with the calls replayed from a CUDA graph: no Python or launch cost
    between kernels, as an engine that captures its steps would see. Under ~30 us a call, eager
    timing measures the host (argument handling and launch), not the kernel."""
    from triton.testing import do_bench_cudagraph

    fn()  # compile (and tune) outside the capture
    return do_bench_cudagraph(fn, rep=rep, return_mode="median")


def rotate(calls):
    state = {"i": 0}

    def run():
        calls[state["i"] % len(calls)]()
        state["i"] += 1
    return run


def copies_for(nbytes: int, l2_bytes: int) -> int:
    """How many input sets to rotate so that they do not all sit in L2."""
    return max(1, min(8, -(-3 * l2_bytes // max(nbytes, 1))))


def ceilings() -> dict:
    n = 1 << 30  # 1 GiB
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bf16_ms = bench_ms(lambda: a @ b)
    out = {"copy_GBps": 2 * n / copy_ms / 1e6, "bf16_TFLOPs": 2 * 8192 ** 3 / bf16_ms / 1e9}
    try:
        a8, b8 = a.to(FP8), b.to(FP8).T  # _scaled_mm wants B column-major
        one = torch.ones((), device="cuda")
        fp8_ms = bench_ms(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        out["fp8_TFLOPs"] = 2 * 8192 ** 3 / fp8_ms / 1e9
    except (RuntimeError, AttributeError) as e:  # no FP8 matmul in this torch build / on this GPU
        out["fp8_TFLOPs"] = None
        out["fp8_error"] = str(e)[:200]
    return out


def mla_case(batch: int, ctx: int, fp8_cache: bool = False, **kw):
    """A decode step: `batch` sequences of `ctx` cached tokens each, blocks shuffled; the cache in
    bf16 or in the FP8 layout (kv_cache_dtype="fp8")."""
    pages = -(-ctx // PAGE)
    num_blocks = batch * pages
    cache = torch.randn(num_blocks, PAGE, RANK + ROPE, device="cuda", dtype=torch.bfloat16)
    if fp8_cache:
        flat = cache.view(-1, RANK + ROPE)
        cache = latent_fp8.quantize_entries(flat[:, :RANK], flat[:, RANK:]).view(num_blocks, PAGE, -1)
    tables = torch.randperm(num_blocks, device="cuda").view(batch, pages)
    q_lat = torch.randn(batch, HEADS, RANK, device="cuda", dtype=torch.bfloat16)
    q_pe = torch.randn(batch, HEADS, ROPE, device="cuda", dtype=torch.bfloat16)
    seq = torch.arange(batch, device="cuda")
    lens = torch.full((batch,), ctx, device="cuda")
    return lambda **over: paged_mla_decode(q_lat, q_pe, cache, tables, seq, lens, 0.1, ctx, **{**kw, **over})


def bench_mla(copy_gbps: float, quick: bool, sweep: bool) -> list[dict]:
    rows = []
    batches = [1, 8, 64, 256]
    contexts = [1024, 4096, 16384, 32768] if not quick else [1024, 4096]
    # Runs 1-2 (H100) found block_h 64, block_n 64, 8 warps, 3 stages, reload_v best among tile
    # shapes (block_h 128 does not fit in shared memory); the sweep now varies the split count and
    # the pipeline depth.
    variants = [dict(num_splits=n) for n in (1, 2, 4, 8)] + [dict(num_stages=4), dict(block_n=32, num_stages=4)]
    for ctx in contexts:
        for b in batches:
            run = mla_case(b, ctx)
            nbytes = decode_bytes(b, HEADS, b * ctx)
            ms = bench_ms(run)
            row = {"kernel": "mla_decode", "batch": b, "ctx": ctx, "ms": ms, "GBps": nbytes / ms / 1e6,
                   "splits": choose_num_splits(b, 2, ctx, torch.device("cuda"))}
            row["frac_copy"] = row["GBps"] / copy_gbps
            if sweep and b >= 64 and ctx in (4096, 32768):
                best = None
                for v in variants:
                    try:
                        v_ms = bench_ms(lambda run=run, v=v: run(**v))
                    except Exception as e:  # a tile too large for shared memory on this GPU
                        print(f"  variant {v} failed: {type(e).__name__}", flush=True)
                        continue
                    if best is None or v_ms < best[0]:
                        best = (v_ms, v)
                if best:
                    row["best_variant"] = best[1]
                    row["best_GBps"] = nbytes / best[0] / 1e6
            rows.append(row)
            print(row, flush=True)
            del run
            torch.cuda.empty_cache()
            if b >= 64 and ctx >= 4096:  # the same step on an FP8 cache: 656 bytes an entry, not 1152
                run = mla_case(b, ctx, fp8_cache=True)
                ms = bench_ms(run)
                gbps = decode_bytes(b, HEADS, b * ctx, cache_entry_bytes=latent_fp8.entry_bytes(RANK, ROPE)) / ms / 1e6
                rows.append({"kernel": "mla_decode_fp8_cache", "batch": b, "ctx": ctx, "ms": ms, "GBps": gbps,
                             "frac_copy": gbps / copy_gbps, "vs_bf16_cache": row["ms"] / ms})
                print(rows[-1], flush=True)
                del run
                torch.cuda.empty_cache()
    return rows


def bench_cache_write(copy_gbps: float) -> list[dict]:
    """MLA's cache write for one layer (norm, key and query rope, store; kernels/cache_write.py),
    Triton against the torch reference in the same run, bf16 and FP8 caches. Bytes: the latent
    and rope key read, the queries' rope part read and written, the entries written."""
    rows = []
    for fp8_cache in (False, True):
        entry = latent_fp8.entry_bytes(RANK, ROPE) if fp8_cache else 2 * (RANK + ROPE)
        for t in (1, 64, 256, 4096):
            kv = torch.randn(t, 2112, device="cuda", dtype=torch.bfloat16)  # q_a + kv_a's output rows
            c_kv, k_pe = kv[:, 1536: 1536 + RANK], kv[:, 1536 + RANK:]
            q_pe = torch.randn(t, HEADS, 192, device="cuda", dtype=torch.bfloat16)[..., 128:]
            weight = torch.rand(RANK, device="cuda", dtype=torch.bfloat16) + 0.5
            rotations = torch.polar(torch.ones(8192, ROPE // 2, device="cuda"),
                                    torch.rand(8192, ROPE // 2, device="cuda") * 6.28)
            positions = torch.randint(0, 8192, (t,), device="cuda")
            blocks = -(-t // PAGE) * 4
            slots = torch.randperm(blocks * PAGE, device="cuda")[:t]
            cache = torch.zeros(blocks, PAGE, entry if fp8_cache else RANK + ROPE, device="cuda",
                                dtype=torch.uint8 if fp8_cache else torch.bfloat16)
            args = (c_kv, k_pe, q_pe, weight, 1e-6, rotations, positions, slots, cache)
            timing = fused_against_reference(lambda a=args: write_latent_entries(*a),
                                             lambda a=args: write_latent_entries_ref(*a))
            nbytes = t * ((RANK + ROPE) * 2 + HEADS * ROPE * 2 * 2 + entry)
            rows.append({"kernel": "cache_write", "tokens": t, "fp8_cache": fp8_cache, **timing,
                         "GBps": nbytes / timing["ms"] / 1e6, "frac_copy": nbytes / timing["ms"] / 1e6 / copy_gbps})
            print(rows[-1], flush=True)
    return rows


def fused_against_reference(fused, reference) -> dict:
    """Device time from graph replays, and eager launches from Python (what fusing saves most
    of where the torch reference is many small launches), for a kernel and its reference."""
    return {"ms": graph_ms(fused), "torch_ms": graph_ms(reference), "eager_ms": bench_ms(fused),
            "torch_eager_ms": bench_ms(reference)}


def bench_router(copy_gbps: float) -> list[dict]:
    """noaux_tc expert selection from the router's float32 logits (256 experts, 8 groups, top-4
    groups, top-8), Triton against the torch reference. Bytes: the logits read, the choices written."""
    rows = []
    bias = torch.randn(EXPERTS, device="cuda") * 0.1
    for m in (1, 64, 256, 4096):
        logits = torch.randn(m, EXPERTS, device="cuda")
        args = (logits, bias, 8, 4, TOP_K, True, 2.5)
        timing = fused_against_reference(lambda a=args: select_experts(*a), lambda a=args: select_experts_ref(*a))
        nbytes = m * (EXPERTS * 4 + TOP_K * 12)
        rows.append({"kernel": "moe_router", "M": m, **timing, "GBps": nbytes / timing["ms"] / 1e6,
                     "frac_copy": nbytes / timing["ms"] / 1e6 / copy_gbps})
        print(rows[-1], flush=True)
    return rows


def bench_rms_norm(copy_gbps: float) -> list[dict]:
    """The decoder layer's norm of h = x + residual over hidden 7168, Triton against the torch
    reference. Bytes: x and the residual read, h and the output written (bf16)."""
    rows = []
    weight = torch.rand(HIDDEN, device="cuda", dtype=torch.bfloat16) + 0.5
    for m in (1, 64, 256, 4096):
        x, res = (torch.randn(m, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(2))

        def reference(x=x, res=res):
            h = x + res
            return rms_norm_ref(h, weight, 1e-6), h
        timing = fused_against_reference(lambda x=x, res=res: rms_norm(x, weight, 1e-6, res), reference)
        nbytes = 4 * m * HIDDEN * 2
        rows.append({"kernel": "rms_norm", "M": m, **timing, "GBps": nbytes / timing["ms"] / 1e6,
                     "frac_copy": nbytes / timing["ms"] / 1e6 / copy_gbps})
        print(rows[-1], flush=True)
    return rows


def bench_act_quant(copy_gbps: float) -> list[dict]:
    rows = []
    for m in [1, 64, 256, 4096]:
        sets = copies_for(m * HIDDEN * 2, 60 << 20)
        xs = [torch.randn(m, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        ms = bench_ms(rotate([lambda x=x: act_quant(x) for x in xs]))
        nbytes = m * HIDDEN * 3 + m * (HIDDEN // 128) * 4
        rows.append({"kernel": "act_quant", "M": m, "K": HIDDEN, "ms": ms, "GBps": nbytes / ms / 1e6,
                     "frac_copy": nbytes / ms / 1e6 / copy_gbps})
        print(rows[-1], flush=True)
    return rows


def random_fp8(shape) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 100).clamp(-448, 448).to(FP8)


def bench_gemm(fp8_tflops: float | None, bf16_tflops: float, quick: bool, autotune: bool) -> list[dict]:
    """Times the tile the engine picks (`gemm_tile`) from a CUDA graph; `eager_ms` is the same call
    launched from Python; with `autotune`, also the best of the tuning candidates."""
    from kernels.fp8_gemm import fp8_gemm_autotuned, gemm_tile

    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ms_list = [1, 8, 64, 256, 512, 2048, 4096] if not quick else [8, 512, 4096]
    for name, n, k in GEMM_SHAPES:
        sets = copies_for(n * k, 60 << 20)
        weights = [(random_fp8((n, k)), torch.rand(-(-n // 128), -(-k // 128), device="cuda") * 1e-2 + 1e-3)
                   for _ in range(sets)]
        for m in ms_list:
            a, a_s = act_quant(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            calls = rotate([lambda w=w, s=s, a=a, a_s=a_s: fp8_gemm(a, a_s, w, s) for w, s in weights])
            ms = graph_ms(calls)
            flops = 2 * m * n * k
            row = {"kernel": "fp8_gemm", "shape": name, "M": m, "N": n, "K": k, "ms": ms,
                   "eager_ms": bench_ms(calls), "tile": gemm_tile(m, n, sms), "TFLOPs": flops / ms / 1e9,
                   "GBps": (n * k + m * k + 2 * m * n) / ms / 1e6}
            row["frac_fp8_peak"] = row["TFLOPs"] / fp8_tflops if fp8_tflops else None
            if autotune:
                tuned = rotate([lambda w=w, s=s, a=a, a_s=a_s: fp8_gemm(a, a_s, w, s, autotune=True)
                                for w, s in weights])
                row["autotuned_ms"] = graph_ms(tuned)
                best = fp8_gemm_autotuned.best_config
                row["autotuned_tile"] = (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps,
                                         best.num_stages)
            bf = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            row["torch_bf16_TFLOPs"] = flops / graph_ms(lambda bf=bf, wb=wb: bf @ wb.T) / 1e9
            rows.append(row)
            print(row, flush=True)
        del weights
        torch.cuda.empty_cache()
    return rows


def bench_moe(copy_gbps: float, fp8_tflops: float | None, quick: bool) -> list[dict]:
    rows = []
    gate_up = torch.empty(EXPERTS, 2 * MOE_INTER, HIDDEN, device="cuda", dtype=FP8)
    down = torch.empty(EXPERTS, HIDDEN, MOE_INTER, device="cuda", dtype=FP8)
    for e in range(EXPERTS):
        gate_up[e] = random_fp8((2 * MOE_INTER, HIDDEN))
        down[e] = random_fp8((HIDDEN, MOE_INTER))
    gate_up_s = torch.rand(EXPERTS, 2 * MOE_INTER // 128, HIDDEN // 128, device="cuda") * 1e-4 + 1e-5
    down_s = torch.rand(EXPERTS, HIDDEN // 128, MOE_INTER // 128, device="cuda") * 1e-4 + 1e-5
    per_expert = 3 * MOE_INTER * HIDDEN
    for t in [1, 8, 64, 256, 2048] if not quick else [8, 256]:
        x = torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16)
        ids = torch.rand(t, EXPERTS, device="cuda").topk(TOP_K, dim=1).indices
        w = torch.rand(t, TOP_K, device="cuda")
        ms = bench_ms(lambda x=x, w=w, ids=ids: fused_moe(x, gate_up, gate_up_s, down, down_s, w, ids))
        touched = int(torch.unique(ids).numel())
        nbytes = touched * per_expert + t * HIDDEN * 4
        flops = 2 * t * TOP_K * per_expert
        row = {"kernel": "fused_moe", "tokens": t, "experts_touched": touched, "ms": ms,
               "GBps": nbytes / ms / 1e6, "frac_copy": nbytes / ms / 1e6 / copy_gbps, "TFLOPs": flops / ms / 1e9}
        row["frac_fp8_peak"] = row["TFLOPs"] / fp8_tflops if fp8_tflops else None
        rows.append(row)
        print(row, flush=True)
    return rows


def ptx_report() -> dict:
    """Which matrix instructions each compiled kernel uses (wgmma is Hopper's fast path)."""
    import os

    root = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    report: dict[str, list] = {}
    for ptx in root.rglob("*.ptx"):
        text = ptx.read_text(errors="ignore")
        report.setdefault(ptx.stem, []).append(
            {"wgmma": text.count("wgmma.mma_async"), "mma.sync": text.count("mma.sync"),
             "cp.async": text.count("cp.async"), "tma": text.count("cp.async.bulk.tensor")})
    return report


def table(rows: list[dict], ceil: dict, device_name: str) -> str:
    out = [f"Device: {device_name}; copy {ceil['copy_GBps']:.0f} GB/s (read+write), bf16 matmul "
           f"{ceil['bf16_TFLOPs']:.0f} TFLOP/s, FP8 matmul "
           f"{ceil['fp8_TFLOPs']:.0f} TFLOP/s" if ceil.get("fp8_TFLOPs") else f"Device: {device_name}", ""]
    out += ["| kernel | shape | time (ms) | achieved | of ceiling |", "|---|---|---|---|---|"]
    for r in rows:
        if r["kernel"] == "mla_decode_fp8_cache":
            out.append(f"| MLA decode, FP8 cache | batch {r['batch']}, ctx {r['ctx']} | {r['ms']:.3f} | "
                       f"{r['GBps']:.0f} GB/s ({r['vs_bf16_cache']:.2f}x the bf16 cache's speed) | "
                       f"{100 * r['frac_copy']:.0f}% of copy |")
        elif r["kernel"] in ("cache_write", "rms_norm", "moe_router"):
            if r["kernel"] == "cache_write":
                what = f"cache write{', FP8' if r['fp8_cache'] else ''} | {r['tokens']} tokens"
            elif r["kernel"] == "rms_norm":
                what = f"RMSNorm + residual | M {r['M']} × {HIDDEN}"
            else:
                what = f"expert selection | M {r['M']} × {EXPERTS} experts"
            out.append(f"| {what} | {r['ms']:.4f} (eager {r['eager_ms']:.4f}) | {r['GBps']:.0f} GB/s (torch "
                       f"reference {r['torch_ms']:.4f} ms, eager {r['torch_eager_ms']:.4f}: "
                       f"{r['torch_ms'] / r['ms']:.1f}x / {r['torch_eager_ms'] / r['eager_ms']:.1f}x) | "
                       f"{100 * r['frac_copy']:.0f}% of copy |")
        elif r["kernel"] == "mla_decode":
            extra = f" (best variant {r['best_GBps']:.0f} GB/s: {r['best_variant']})" if "best_GBps" in r else ""
            out.append(f"| MLA decode | batch {r['batch']}, ctx {r['ctx']}, splits {r['splits']} | {r['ms']:.3f} | "
                       f"{r['GBps']:.0f} GB/s{extra} | {100 * r['frac_copy']:.0f}% of copy |")
        elif r["kernel"] == "act_quant":
            out.append(f"| act quant | M {r['M']} × K {r['K']} | {r['ms']:.4f} | {r['GBps']:.0f} GB/s | "
                       f"{100 * r['frac_copy']:.0f}% of copy |")
        elif r["kernel"] == "fp8_gemm":
            frac = f"{100 * r['frac_fp8_peak']:.0f}% of FP8 peak" if r["frac_fp8_peak"] else "-"
            tuned = (f"; best candidate {r['autotuned_ms']:.4f} ms {r['autotuned_tile']}"
                     if "autotuned_ms" in r else "")
            out.append(f"| FP8 GEMM {r['shape']} | M {r['M']}, N {r['N']}, K {r['K']} | {r['ms']:.4f} "
                       f"(eager {r['eager_ms']:.4f}) | {r['TFLOPs']:.0f} TFLOP/s, {r['GBps']:.0f} GB/s (torch bf16: "
                       f"{r['torch_bf16_TFLOPs']:.0f} TFLOP/s; tile {r['tile']}{tuned}) | {frac} |")
        elif r["kernel"] == "fused_moe":
            out.append(f"| fused MoE | {r['tokens']} tokens, {r['experts_touched']} experts touched | {r['ms']:.3f} | "
                       f"{r['GBps']:.0f} GB/s, {r['TFLOPs']:.0f} TFLOP/s | {100 * r['frac_copy']:.0f}% of copy |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--sweep", action="store_true", help="also try MLA decode tile variants")
    ap.add_argument("--json", type=Path, help="write every row here")
    ap.add_argument("--only", choices=["mla", "quant", "gemm", "moe", "write", "norm", "router"], action="append")
    ap.add_argument("--autotune", action="store_true", help="also time the best FP8 GEMM tuning candidate")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py measures GPU kernels and needs a CUDA device; none is visible.")
        sys.exit(2)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    ceil = ceilings()
    print("ceilings:", ceil, flush=True)
    only = set(args.only or ["mla", "quant", "gemm", "moe", "write", "norm", "router"])
    rows: list[dict] = []
    if "mla" in only:
        rows += bench_mla(ceil["copy_GBps"], args.quick, args.sweep)
    if "quant" in only:
        rows += bench_act_quant(ceil["copy_GBps"])
    if "gemm" in only:
        rows += bench_gemm(ceil["fp8_TFLOPs"], ceil["bf16_TFLOPs"], args.quick, args.autotune)
    if "moe" in only:
        rows += bench_moe(ceil["copy_GBps"], ceil["fp8_TFLOPs"], args.quick)
    if "write" in only:
        rows += bench_cache_write(ceil["copy_GBps"])
    if "norm" in only:
        rows += bench_rms_norm(ceil["copy_GBps"])
    if "router" in only:
        rows += bench_router(ceil["copy_GBps"])
    ptx = ptx_report()
    for kernel, variants in sorted(ptx.items()):
        print("ptx", kernel, variants[:6])
    if args.json:
        args.json.write_text(json.dumps({"device": name, "ceilings": ceil, "rows": rows, "ptx": ptx}, indent=1))
    print()
    print(table(rows, ceil, name))


if __name__ == "__main__":
    main()
