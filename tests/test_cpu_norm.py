"""The compiled RMSNorm (and its fused residual add), the MLA cache write and SwiGLU's activation
against the torch definitions the model follows, at every variant this machine runs: the same
two bf16 roundings, so results agree to the last bit except where the kernel's own rounding of
the first step (the sum of squares ordered differently, or its exp) moves a value across a
rounding boundary (see TWO_ROUNDINGS_ULPS)."""

import pytest
import torch

from kernels import native
from kernels.cpu_build import VARIANTS
from model.layers import RMSNorm
from tests.cpu_variants import use_variant

# out = bf16(w * bf16(t)) where the kernel's t differs from torch's by a few float32 units (the
# sum of squares in another order, silu's exp): bf16(t) then lands at most one unit u_t away
# (u_t <= 2^-7 |t|), so the exact products differ by at most |w| u_t < 2 units of the output
# (its mantissa is at least half t's), and the two results, each rounded to the nearest value,
# lie at most 2 units apart. bf16_ulps measures in 2^-7 of the magnitude, at least one unit.
TWO_ROUNDINGS_ULPS = 2.0


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of bf16's last place at the larger magnitude."""
    a, b = a.double(), b.double()
    unit = torch.maximum(a.abs(), b.abs()).clamp_min(1e-30) * 2.0**-7
    return float(((a - b).abs() / unit).max()) if a.numel() else 0.0


def assert_rounds_as_reference(out: torch.Tensor, ref: torch.Tensor) -> None:
    """bf16 like the reference, all but a rare value exactly equal, none further off than the
    kernel's own first rounding can move it."""
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert bf16_ulps(out, ref) <= TWO_ROUNDINGS_ULPS
    if out.numel():
        assert (out == ref).float().mean() > 0.999


@pytest.fixture(autouse=True, params=VARIANTS)
def variant(request, monkeypatch):
    """Every test here runs at each variant of its family: activation for silu_mul's, else norm."""
    use_variant(monkeypatch, "activation" if "silu" in request.node.name else "norm", request.param)


@pytest.mark.parametrize("shape", [(1, 7168), (5, 3, 64), (257, 512), (2048, 384), (0, 512)])
def test_norm_matches_reference(shape):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 4).bfloat16()
    norm = RMSNorm(torch.randn(shape[-1]).bfloat16(), 1e-6)
    out = native.rms_norm(x, norm.weight, norm.eps)
    ref = norm.reference(x)
    assert_rounds_as_reference(out, ref)


def test_residual_add_is_fused_exactly():
    torch.manual_seed(1)
    x, y = torch.randn(300, 512).bfloat16(), torch.randn(300, 512).bfloat16()
    norm = RMSNorm(torch.randn(512).bfloat16(), 1e-6)
    out, h = norm(x, residual=y)
    assert torch.equal(h, x + y)
    assert_rounds_as_reference(out, norm.reference(x + y))


def test_strided_rows_and_model_dispatch():
    """q_a and c_kv are column slices of the stacked projection: read in place, written dense."""
    torch.manual_seed(2)
    stacked = torch.randn(40, 960).bfloat16()
    part = stacked[:, 384:896]
    norm = RMSNorm(torch.randn(512).bfloat16(), 1e-6)
    out = norm(part)
    assert out.is_contiguous()
    assert_rounds_as_reference(out, norm.reference(part))
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


def test_cache_entries_and_rope_in_one_pass():
    """MLA's cache write (norm of the latent, rope of the key) and the queries' rope, fused: the
    same rows as the torch path, within one bf16 unit, only at the step's slots; q_pe is a strided
    view of the projection's output and is rotated where it lies."""
    from engine.model_config import ModelConfig
    from model.checkpoint_maker import preset_config
    from model.rope import RotaryEmbedding

    cfg = ModelConfig.from_dict(preset_config("small"))  # YaRN rope, as DeepSeek-V3
    rope = RotaryEmbedding(cfg, 512)
    torch.manual_seed(4)
    tokens, heads, rank, rdim = 70, 3, 64, cfg.qk_rope_head_dim
    kv = torch.randn(tokens, 16 + rank + rdim).bfloat16()
    c_kv, k_pe = kv[:, 16: 16 + rank], kv[:, 16 + rank:]
    q = torch.randn(tokens, heads, 32 + rdim).bfloat16()
    q_pe = q[..., 32:]
    norm = RMSNorm(torch.randn(rank).bfloat16(), 1e-6)
    positions = torch.randint(0, 512, (tokens,))
    slots = torch.randperm(8 * 16)[:tokens]
    cache = torch.full((8, 16, rank + rdim), float("nan")).bfloat16()
    expected = cache.clone()
    expected.view(-1, rank + rdim)[slots] = torch.cat([norm.reference(c_kv), rope(k_pe, positions)], dim=-1)
    expected_q = rope(q_pe.clone(), positions)
    native.mla_cache_entries(c_kv, k_pe, q_pe, norm.weight, norm.eps, rope.rotations, positions, slots, cache)
    written = cache.view(-1, rank + rdim)[slots]
    assert_rounds_as_reference(written, expected.view(-1, rank + rdim)[slots])
    untouched = torch.ones(8 * 16, dtype=torch.bool)
    untouched[slots] = False
    assert cache.view(-1, rank + rdim)[untouched].isnan().all()
    assert bf16_ulps(q[..., 32:], expected_q) <= 1.0
    with pytest.raises(ValueError, match="slot past the cache"):
        native.mla_cache_entries(c_kv, k_pe, q_pe, norm.weight, norm.eps, rope.rotations, positions, slots + 1000,
                                 cache)


@pytest.mark.parametrize("shape", [(2048, 2 * 1536), (7, 2 * 40), (3, 2, 2 * 256), (0, 512)])
def test_silu_mul_matches_reference(shape):
    """SwiGLU's activation in one pass (widths with and without a vector tail, leading dims,
    a strided view, no rows): the reference's two roundings, so at most a rare unit in the last
    place from silu's exp."""
    torch.manual_seed(2)
    h = (torch.randn(shape[:-1] + (shape[-1] + 16,)) * 3).bfloat16()[..., 16:]  # rows strided
    gate, up = h.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    out = native.silu_mul(h)
    assert_rounds_as_reference(out, ref)


def test_silu_mul_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="want bf16"):
        native.silu_mul(torch.randn(4, 64))
    with pytest.raises(ValueError, match="want bf16"):
        native.silu_mul(torch.randn(4, 63).bfloat16())
