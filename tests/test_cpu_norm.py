"""The compiled RMSNorm (and its fused residual add) against the torch definition the model
follows: the same two bf16 roundings, so results agree to the last bit except where the sum of
squares, ordered differently, moves a value across a rounding boundary (one unit in the last place)."""

import pytest
import torch

from kernels import native
from model.layers import RMSNorm
from tests.test_cpu_attention import compiled_kernels


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of bf16's last place at the larger magnitude."""
    a, b = a.double(), b.double()
    unit = torch.maximum(a.abs(), b.abs()).clamp_min(1e-30) * 2.0**-7
    return float(((a - b).abs() / unit).max()) if a.numel() else 0.0


@pytest.fixture(autouse=True)
def needs_library():
    if not compiled_kernels():
        pytest.skip("no C++ compiler")


@pytest.mark.parametrize("shape", [(1, 7168), (5, 3, 64), (257, 512), (2048, 384), (0, 512)])
def test_norm_matches_reference(shape):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 4).bfloat16()
    norm = RMSNorm(torch.randn(shape[-1]).bfloat16(), 1e-6)
    out = native.rms_norm(x, norm.weight, norm.eps)
    ref = norm.reference(x)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert bf16_ulps(out, ref) <= 1.0
    if x.numel():
        assert (out == ref).float().mean() > 0.999


def test_residual_add_is_fused_exactly():
    torch.manual_seed(1)
    x, y = torch.randn(300, 512).bfloat16(), torch.randn(300, 512).bfloat16()
    norm = RMSNorm(torch.randn(512).bfloat16(), 1e-6)
    out, h = norm(x, residual=y)
    assert torch.equal(h, x + y)
    assert bf16_ulps(out, norm.reference(x + y)) <= 1.0


def test_strided_rows_and_model_dispatch():
    """q_a and c_kv are column slices of the stacked projection: read in place, written dense."""
    torch.manual_seed(2)
    stacked = torch.randn(40, 960).bfloat16()
    part = stacked[:, 384:896]
    norm = RMSNorm(torch.randn(512).bfloat16(), 1e-6)
    out = norm(part)
    assert out.is_contiguous()
    assert bf16_ulps(out, norm.reference(part)) <= 1.0
    # float32 (the parity tests' dtype) keeps the torch definition
    norm32 = RMSNorm(torch.randn(512), 1e-6)
    assert torch.equal(norm32(part.float()), norm32.reference(part.float()))


def test_rejects_what_it_cannot_take():
    norm = RMSNorm(torch.randn(64).bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="bf16 rows"):
        native.rms_norm(torch.randn(4, 64), norm.weight, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        native.rms_norm(torch.randn(4, 32).bfloat16(), norm.weight, 1e-6)
    with pytest.raises(ValueError, match="host memory"):
        native.rms_norm(torch.empty(4, 64, dtype=torch.bfloat16, device="meta"), norm.weight, 1e-6)
    nan = torch.full((2, 64), float("nan")).bfloat16()
    assert torch.isnan(native.rms_norm(nan, norm.weight, 1e-6)).all()
