"""Build the engine's Triton kernels for an H100 (sm_90) on a machine without a GPU, and say what
the compiler made of each launch configuration: registers, stack (spills), shared memory, and how
each tensor-core product was spread over the warps.

CI and most development machines have no GPU, and the interpreter that tests the kernels there
checks their arithmetic, not whether a configuration compiles for the GPU, fits its shared memory
or spills registers. Triton compiles to sm_90 and runs ptxas without a device, so those can be
checked on every change. `python scripts/hopper_build.py` prints the table.

A build is made from the values a launch passes, in the kernel's argument order (small host tensors
stand for the device ones), through Triton's own launch-time specialization: aligned pointers and
integers divisible by 16 marked so, integers equal to 1 folded, except where the kernel exempts them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from kernels.backend import cdiv  # noqa: E402

# The most shared memory one H100 block may opt into (227 KB).
HOPPER_SHARED_LIMIT = 232448
HOPPER_SMS = 132


def pointer(dtype: torch.dtype) -> torch.Tensor:
    """A stand-in for a tensor argument: only its type and its (16-byte) alignment matter."""
    return torch.empty(16, dtype=dtype)


@dataclass
class TensorCoreProduct:
    """One tl.dot as compiled: its output tile, which instruction family and how its warps cover it.
    `replication` > 1 means several warp groups compute the same output elements."""
    shape: tuple[int, int]
    mma_version: int
    warps: tuple[int, int]
    instr: tuple[int, ...]

    @property
    def replication(self) -> int:
        rows = self.warps[0] * (16 if self.mma_version == 3 else self.instr[0])
        cols = self.warps[1] * self.instr[1]
        return max(1, rows // self.shape[0]) * max(1, cols // self.shape[1])


@dataclass
class KernelBuild:
    label: str
    registers: int
    stack_bytes: int
    shared_bytes: int
    num_warps: int
    products: list[TensorCoreProduct] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= HOPPER_SHARED_LIMIT


@dataclass
class _Param:
    name: str
    is_constexpr: bool
    exempt: bool  # do_not_specialize
    exempt_alignment: bool


def _params(kernel) -> list[_Param]:
    """The kernel's arguments, from a compiled kernel or (TRITON_INTERPRET=1) an interpreted one."""
    if hasattr(kernel, "params"):
        return [_Param(p.name, p.is_constexpr, p.do_not_specialize, p.do_not_specialize_on_alignment)
                for p in kernel.params]
    exempt = set(kernel.kwargs.get("do_not_specialize") or ())
    exempt_alignment = set(kernel.kwargs.get("do_not_specialize_on_alignment") or ())
    return [_Param(p.name, "constexpr" in str(p.annotation), p.name in exempt, p.name in exempt_alignment)
            for p in inspect.signature(kernel.fn).parameters.values()]


def _specialize(kernel, args: list) -> tuple[dict, dict, dict]:
    """Triton's own launch-time specialization of `args` (tensors on any device stand for pointers)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    params = _params(kernel)
    if len(args) != len(params):
        raise ValueError(f"{kernel.fn.__name__} takes {len(params)} arguments, got {len(args)}")
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, value) in enumerate(zip(params, args)):
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, not param.exempt, not param.exempt_alignment)
        if kind == "constexpr":  # an integer 1
            signature[param.name], constexprs[param.name] = kind, key
            continue
        signature[param.name] = kind
        if key and BaseBackend.parse_attr(key):
            attrs[(i,)] = BaseBackend.parse_attr(key)
    return signature, constexprs, attrs


@functools.cache
def _cuobjdump() -> str:
    from triton.backends.nvidia import compiler as nvidia
    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", report)
    if match is None:
        raise RuntimeError(f"cuobjdump gave no resource usage:\n{report}")
    return int(match.group(1)), int(match.group(2))


_LAYOUT = re.compile(r"^(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = (\d+).*?warpsPerCTA = \[([\d, ]+)\]"
                     r".*?instrShape = \[([\d, ]+)\]", re.M)
_DOT = re.compile(r"(?:ttng\.warp_group_dot|tt\.dot) .*-> tensor<(\d+)x(\d+)x\w+, (#mma\d*)>")


def _products(ttgir: str) -> list[TensorCoreProduct]:
    layouts = {name: (int(major), tuple(int(w) for w in warps.split(",")), tuple(int(s) for s in instr.split(",")))
               for name, major, warps, instr in _LAYOUT.findall(ttgir)}
    products = []
    for m, n, name in _DOT.findall(ttgir):
        version, warps, instr = layouts[name]
        products.append(TensorCoreProduct((int(m), int(n)), version, warps[:2], instr))
    return products


def build_for_hopper(label: str, kernel, args: list, num_warps: int, num_stages: int) -> KernelBuild:
    """Compile `kernel` as a launch with `args` would, for sm_90, and read back what it uses."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not hasattr(kernel, "params"):
        raise RuntimeError(f"{label}: the kernel was defined under TRITON_INTERPRET=1; build in a process "
                           "without it (python scripts/hopper_build.py does that)")
    signature, constexprs, attrs = _specialize(kernel, args)
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    registers, stack = _resource_usage(compiled.asm["cubin"])
    return KernelBuild(label, registers, stack, compiled.metadata.shared, num_warps,
                       _products(compiled.asm["ttgir"]))


def engine_launches(heads: int = 128, hidden: int = 7168, moe_inter: int = 2048, experts: int = 256,
                    top_k: int = 8) -> list[tuple[str, object, list, int, int]]:
    """Every configuration the engine launches on an H100 for DeepSeek-V3's shapes, with the tile
    choices taken from the launch wrappers' own functions: (label, kernel, args, warps, stages)."""
    from kernels import cache_write, fp8_gemm, fused_moe, mla_decode, moe_router, quant, rms_norm

    bf16, f32, fp8 = pointer(torch.bfloat16), pointer(torch.float32), pointer(torch.float8_e4m3fn)
    i32, i64 = pointer(torch.int32), pointer(torch.int64)
    launches = []
    block_h, block_n, warps, stages = mla_decode.decode_tile(heads)
    for fp8_cache in (False, True):
        for single in (True, False):
            launches.append((f"mla decode {heads} heads, {'one split' if single else 'split'}"
                             f"{', fp8 cache' if fp8_cache else ''}", mla_decode._mla_decode_split_kernel,
                             [bf16, bf16, pointer(torch.uint8) if fp8_cache else bf16, i64, i32, i32, bf16, f32,
                              f32, heads, 64, 0.1, 1 if single else 2, 512, 64, 64, single, block_h, block_n, False,
                              True, fp8_cache], warps, stages))
    launches.append(("mla decode merge", mla_decode._mla_decode_merge_kernel, [f32, f32, bf16, 2, 512, 2], 4, 3))

    linears = {"q_a+kv_a": (2112, hidden), "q_b": (heads * 192, 1536), "kv_b": (heads * 256, 512),
               "o_proj": (hidden, heads * 128), "dense gate_up": (2 * 18432, hidden), "dense down": (hidden, 18432)}
    tiles = {}
    for name, (n, k) in linears.items():
        for m in (1, 16, 17, 64, 65, 256, 512, 1024, 1025, 4096, 16384):
            tiles.setdefault(fp8_gemm.gemm_tile(m, n, HOPPER_SMS), (name, n, k, m))
    for (bm, bn, warps, stages), (name, n, k, m) in tiles.items():
        launches.append((f"fp8 gemm {bm}x{bn} ({name}, M={m})", fp8_gemm._fp8_gemm_kernel,
                         [fp8, f32, fp8, f32, bf16, m, n, k, 0, bm, bn, 8, k % 128 == 0], warps, stages))

    moe_tiles = {fused_moe._moe_tiles(t, torch.device("cuda")): t for t in (1, 64, 65, 512, 513, 8192)}
    for (bm, bn, warps, stages), t in moe_tiles.items():
        for first, (n, k) in (("gate_up", (2 * moe_inter, hidden)), ("down", (hidden, moe_inter))):
            launches.append((f"moe {first} {bm}x{bn} ({t} tokens)", fused_moe._grouped_fp8_gemm_kernel,
                             [fp8, f32, fp8, f32, bf16, i64, i64, f32, n, k, t * top_k, experts, top_k,
                              first == "gate_up", first == "down", bm, bn], warps, stages))
    for silu in (False, True):
        k = moe_inter if silu else hidden
        launches.append((f"quant{' silu*up' if silu else ''} K={k}", quant._quant_kernel,
                         [bf16, fp8, f32, k, 2 * k if silu else k, k, silu, 128, quant.GROUPS_PER_PROGRAM, True],
                         4, 3))
    bins = triton.next_power_of_2(experts + 1)
    launches.append(("moe align runs", fused_moe._expert_runs_kernel,
                     [i64, 2048, 0, experts, i32, i32, i64, 640, 64, bins, fused_moe.PLACE_BLOCK,
                      fused_moe.tile_block(bins)], fused_moe.RUNS_WARPS, 3))
    launches.append(("moe align place", fused_moe._place_pairs_kernel,
                     [i64, 2048, 0, experts, i32, i32, i64, fused_moe.PLACE_BLOCK], 4, 3))
    launches.append(("moe router select", moe_router._select_experts_kernel,
                     [f32, experts, f32, f32, i64, 2.5, 8, experts // 8, 4, top_k, True,
                      *moe_router.block_sizes(experts, 8, top_k)], 4, 3))
    for name, cols, residual in (("hidden", hidden, True), ("q_a", 1536, False), ("kv_a", 512, False)):
        block, warps = rms_norm.launch_config(cols)
        launches.append((f"rms norm {name} {cols}{' + residual' if residual else ''}", rms_norm._rms_norm_kernel,
                         [bf16, cols, bf16, cols, bf16, bf16, bf16, cols, 1e-6, residual, block], warps, 3))
    for fp8_cache in (False, True):
        launches.append((f"latent cache write{', fp8 cache' if fp8_cache else ''}", cache_write._write_latent_kernel,
                         [bf16, 2112, bf16, 2112, bf16, heads * 192, 192, heads, bf16, 1e-6, f32, i64, i64,
                          pointer(torch.uint8) if fp8_cache else bf16,
                          *cache_write.block_sizes(512, 64, heads, fp8_cache)], 4, 3))
    return launches


def build_engine_kernels(**shapes) -> list[KernelBuild]:
    return [build_for_hopper(*launch) for launch in engine_launches(**shapes)]


def format_table(builds: list[KernelBuild]) -> str:
    lines = ["| launch | warps | registers | stack (spills) | shared memory | tensor-core products |",
             "| --- | --- | --- | --- | --- | --- |"]
    for b in builds:
        products = ", ".join(
            f"{p.shape[0]}x{p.shape[1]} v{p.mma_version} warps {p.warps[0]}x{p.warps[1]}"
            + (f" (x{p.replication} repeated)" if p.replication > 1 else "") for p in b.products) or "-"
        lines.append(f"| {b.label} | {b.num_warps} | {b.registers} | {b.stack_bytes} B | "
                     f"{cdiv(b.shared_bytes, 1024)} KB{'' if b.fits else ' (TOO MUCH)'} | {products} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the builds here")
    args = parser.parse_args()
    builds = build_engine_kernels()
    print(format_table(builds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(b) for b in builds], f, indent=1)


def read_builds(path: str) -> list[KernelBuild]:
    with open(path) as f:
        rows = json.load(f)
    return [KernelBuild(**{**row, "products": [TensorCoreProduct(tuple(p["shape"]), p["mma_version"], tuple(p["warps"]),
                                                                   tuple(p["instr"])) for p in row["products"]]})
            for row in rows]


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"  # before the kernels are defined: they must compile, not interpret
    main()
