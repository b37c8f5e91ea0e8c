"""The engine's Triton kernels, compiled for an H100 (sm_90) without a GPU: every configuration the
launch wrappers pick must compile, fit the H100's shared memory, and put its large products on the
Hopper tensor-core instructions; the GEMM kernels must not spill. The interpreter tests check the
kernels' arithmetic; these check what only a GPU build shows."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.backends.nvidia")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # a tool, not a product module

import hopper_build  # noqa: E402
from hopper_build import KernelBuild, pointer  # noqa: E402

from kernels import fp8_gemm, mla_decode  # noqa: E402


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> list[KernelBuild]:
    """Built in a process of its own: this one runs the kernels under the interpreter, where they
    are not compilable objects."""
    out = tmp_path_factory.mktemp("hopper") / "builds.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "hopper_build.py"), "--json", str(out)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return hopper_build.read_builds(str(out))


def test_every_engine_launch_builds_for_hopper(builds):
    print("\n" + hopper_build.format_table(builds))
    labels = [b.label for b in builds]
    assert len(labels) == len(set(labels)) == len(hopper_build.engine_launches())
    for b in builds:
        assert b.shared_bytes <= hopper_build.HOPPER_SHARED_LIMIT, f"{b.label}: {b.shared_bytes} B of shared memory"
        assert 0 < b.registers <= 255, b.label


def test_large_tiles_use_hopper_tensor_cores(builds):
    products = [(b.label, p) for b in builds for p in b.products]
    assert products, "no tensor-core product found in any build"
    for label, p in products:
        if p.shape[0] >= 64:
            assert p.mma_version == 3, f"{label}: {p.shape} on mma v{p.mma_version}, not wgmma"


def test_kernels_other_than_decode_do_not_spill(builds):
    gemms = [b for b in builds if b.label.startswith(("fp8 gemm", "moe", "quant", "latent cache write", "rms norm"))]
    assert len(gemms) >= 14
    for b in gemms:
        assert b.stack_bytes == 0, f"{b.label}: {b.stack_bytes} B of stack (spilled registers)"
        assert all(p.replication == 1 for p in b.products), b.label


def test_launch_table_follows_the_wrappers_tile_choices():
    launches = {label: (args, warps, stages) for label, _, args, warps, stages in hopper_build.engine_launches()}
    block_h, block_n, warps, stages = mla_decode.decode_tile(128)
    args, w, s = launches["mla decode 128 heads, split"]
    assert (args[17], args[18], w, s) == (block_h, block_n, warps, stages)
    big = fp8_gemm.gemm_tile(4096, 7168, 132)
    assert any(label.startswith(f"fp8 gemm {big[0]}x{big[1]} ") and (a[9], a[10], w, s) == big
               for label, (a, w, s) in launches.items())


def test_specialization_matches_a_launch():
    kernel = fp8_gemm._fp8_gemm_kernel  # M and M_BUCKET are exempt from specialization
    f8, f32, bf16 = pointer(torch.float8_e4m3fn), pointer(torch.float32), pointer(torch.bfloat16)
    args = [f8, f32, f8, f32, bf16, 32, 1, 7168, 0, 64, 128, 8, True]
    signature, constexprs, attrs = hopper_build._specialize(kernel, args)
    assert signature["a_ptr"] == "*fp8e4nv" and signature["c_ptr"] == "*bf16"
    assert signature["M"] == "i32" and (5,) not in attrs  # divisible by 16, but exempt
    assert constexprs["N"] == 1  # an integer 1 is folded
    assert attrs[(7,)] == [["tt.divisibility", 16]] and attrs[(0,)] == [["tt.divisibility", 16]]
    assert constexprs["BLOCK_M"] == 64 and signature["EVEN_K"] == "constexpr"
    with pytest.raises(ValueError, match="takes 13 arguments"):
        hopper_build._specialize(kernel, [f8])
