"""The compiled bf16 linear (AMX tiles or AVX-512 BF16 dot products, weight kept in strips) against
torch's bf16 matmul, at each variant this machine runs: both sum in float32 and round once, so
they differ only where the order of the sum moves a value across a rounding boundary."""

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_build, native
from model.layers import Linear, StackedLinear
from tests.cpu_variants import use_variant


@pytest.fixture(autouse=True, params=cpu_build.FAMILIES["linear"][1])
def variant(request, monkeypatch):
    use_variant(monkeypatch, "linear", request.param)
    assert native.linear_available(torch.zeros(32, 32, dtype=torch.bfloat16))


def assert_matches_torch(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = F.linear(x, w)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    # One bf16 unit at the result, plus what float32 sums in another order can move by (which
    # matters only where the terms cancel to a result far smaller than they are).
    magnitude = F.linear(x.float().abs(), w.float().abs())
    slack = ref.float().abs() * 2.0**-7 + magnitude * 2.0**-20
    assert bool(((out.float() - ref.float()).abs() <= slack).all())
    if out.numel():
        assert (out == ref).float().mean() > 0.999


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 33, 100, 300])
@pytest.mark.parametrize("k,n", [(32, 32), (384, 96), (512, 960)])
def test_linear_matches_torch(rows, k, n):
    torch.manual_seed(rows * 7 + k + n)
    x = torch.randn(rows, k).bfloat16()
    w = (torch.randn(n, k) / k**0.5).bfloat16()
    assert_matches_torch(native.linear(x, native.pack_strips(w)), x, w)


def test_strided_rows_leading_dims_and_many_column_chunks():
    """Inputs that are column slices are read in place; leading dims are kept; a weight wider than
    one chunk of strips (3072 x 512: several chunks per row block) is covered whole."""
    torch.manual_seed(3)
    wide = torch.randn(2, 150, 960).bfloat16()
    x = wide[..., 384:896]
    w = (torch.randn(3072, 512) / 23).bfloat16()
    out = native.linear(x, native.pack_strips(w))
    assert out.shape == (2, 150, 3072)
    assert_matches_torch(out, x, w)


def test_strips_round_trip():
    w = torch.randn(96, 64).bfloat16()
    strips = native.pack_strips(w)
    assert strips.shape == (3, 32, 32, 2)
    assert strips[1, 5, 7, 1] == w[32 + 7, 11]
    assert torch.equal(native.unpack_strips(strips), w)


def test_model_linears_dispatch_to_the_kernel():
    """bf16 host weights get strips on first use; decode-sized inputs go through them, with torch's
    results; larger ones through torch's matmul."""
    torch.manual_seed(4)
    w = {"a.weight": (torch.randn(384, 512) / 23).bfloat16(), "b.weight": (torch.randn(576, 512) / 23).bfloat16()}
    stacked = StackedLinear(w, ["a.weight", "b.weight"])
    assert stacked.strips is not None
    x = torch.randn(64, 512).bfloat16()
    a, b = stacked.parts(x)
    assert_matches_torch(a, x, w["a.weight"])
    assert_matches_torch(b, x, w["b.weight"])
    big = torch.randn(native.linear_max_rows() + 1, 512).bfloat16()
    assert torch.equal(stacked(big), F.linear(big, stacked.weight))
    # The vocabulary's 258 rows are not whole strips: zero rows pad the strips, cut off the output.
    odd = Linear((torch.randn(258, 512) / 23).bfloat16())
    assert odd.strips is not None and odd.strips.shape[0] == 9
    assert odd(x).shape == (64, 258)
    assert_matches_torch(odd(x), x, odd.weight)
    assert torch.equal(odd(big), F.linear(big, odd.weight))
    assert Linear(torch.randn(64, 64)).strips is None  # float32 stays torch's


def test_refusals():
    strips = native.pack_strips(torch.randn(64, 64).bfloat16())
    with pytest.raises(ValueError, match="linear"):
        native.linear(torch.randn(3, 32).bfloat16(), strips)  # K 32 against the weight's 64
    with pytest.raises(ValueError, match="linear"):
        native.linear(torch.randn(3, 64), strips)  # float32 input
    assert not native.linear_available(torch.randn(48, 64).bfloat16())  # 48 outputs: not whole strips
    assert not native.linear_available(torch.randn(64, 48).bfloat16())  # K 48


@pytest.mark.parametrize("rows", [1, 20, 300])
def test_per_head_products_match_bmm(rows):
    """MLA's absorbed products: q_nope is a strided slice of the q_b output, one weight per head."""
    torch.manual_seed(5 + rows)
    heads, nope, rope, rank = 8, 64, 64, 512
    q = torch.randn(rows, heads, nope + rope).bfloat16()
    q_nope = q[..., :nope]
    w_uk = (torch.randn(heads, nope, rank) / 8).bfloat16()
    got = native.linear_heads(q_nope, native.pack_strips(w_uk.transpose(1, 2).contiguous()))
    ref = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
    assert got.shape == (rows, heads, rank) and got.is_contiguous()
    for h in range(heads):
        assert_matches_torch(got[:, h], q_nope[:, h], w_uk[h].t())
    assert (got == ref).float().mean() > 0.999
    w_uv = (torch.randn(heads, 64, rank) / 23).bfloat16()
    o = torch.randn(rows, heads, rank).bfloat16()
    out = native.linear_heads(o, native.pack_strips(w_uv))
    for h in range(heads):
        assert_matches_torch(out[:, h], o[:, h], w_uv[h])
    with pytest.raises(ValueError, match="per head"):
        native.linear_heads(o[:, :4], native.pack_strips(w_uv))  # 4 heads against 8 weights
