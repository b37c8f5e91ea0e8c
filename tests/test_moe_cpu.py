"""The CPU path's routed experts (dequantized weights): the compiled kernel at each variant this
machine runs (AMX tiles, AVX-512 BF16), padded batched
matmuls, and the per-expert loop they fall back to under skewed routing, against each choice
computed on its own."""

import pytest
import torch
import torch.nn.functional as F

from kernels import native
from kernels.routed_experts import RoutedExperts
from tests.cpu_variants import each_variant, use_variant

E, HIDDEN, INTER, K = 8, 32, 24, 3


def reference(gate_up, down, first, x, weights, ids):
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) - first
            if 0 <= e < gate_up.shape[0]:
                gate, up = (gate_up[e].double() @ x[t].double()).chunk(2)
                out[t] += weights[t, j].double() * (down[e].double() @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("first,local", [(0, E), (2, 4)])
@pytest.mark.parametrize("skewed", [False, True])
def test_routed_experts_match_each_choice(monkeypatch, first, local, skewed):
    torch.manual_seed(0)
    gate_up, down = torch.randn(local, 2 * INTER, HIDDEN) / 5, torch.randn(local, HIDDEN, INTER) / 5
    experts = RoutedExperts(gate_up, down, first)
    tokens = 600 if skewed else 40
    x = torch.randn(tokens, HIDDEN)
    weights = torch.rand(tokens, K)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(tokens)])
    if skewed:  # every token picks expert `first`: padding every expert to its count would not pay
        ids[:, 0] = first
        ids[:, 1:] = torch.where(ids[:, 1:] == first, first + 1, ids[:, 1:])
    loops = []
    per_expert = experts._per_expert
    monkeypatch.setattr(experts, "_per_expert", lambda *a: loops.append(1) or per_expert(*a))
    out = experts(x, weights, ids)
    assert bool(loops) == skewed
    assert torch.allclose(out.double(), reference(gate_up, down, first, x, weights, ids), atol=1e-5)


def test_routed_experts_without_tokens_or_local_choices():
    experts = RoutedExperts(torch.randn(2, 2 * INTER, HIDDEN), torch.randn(2, HIDDEN, INTER), 4)
    assert experts(torch.empty(0, HIDDEN), torch.empty(0, K), torch.empty(0, K, dtype=torch.long)).shape == (0, HIDDEN)
    x = torch.randn(5, HIDDEN)
    ids = torch.tensor([[0, 1, 2]] * 5)  # every choice on another rank
    assert torch.equal(experts(x, torch.rand(5, K), ids), torch.zeros_like(x))


@pytest.mark.parametrize("first,local", [(0, E), (2, 4)])
@pytest.mark.parametrize("tokens", [1, 37, 600])
@each_variant("moe")
def test_compiled_experts_match_each_choice(monkeypatch, variant, first, local, tokens):
    """The compiled kernel (bf16, hidden 128, expert width 64), on AMX tiles or AVX-512 BF16:
    16-row work items with short last ones, experts without tokens, choices for other ranks'
    experts, skewed routing."""
    hidden, inter = 128, 64
    use_variant(monkeypatch, "moe", variant)
    assert native.moe_experts_available(torch.bfloat16, hidden, inter)
    torch.manual_seed(1)
    gate_up = (torch.randn(local, 2 * inter, hidden) / hidden ** 0.5).bfloat16()
    down = (torch.randn(local, hidden, inter) / inter ** 0.5).bfloat16()
    experts = RoutedExperts(gate_up, down, first)
    assert experts.compiled
    x = torch.randn(tokens, hidden).bfloat16()
    weights = torch.rand(tokens, K)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(tokens)])
    ids[: tokens // 2, 0] = first  # half the tokens on one expert
    ref = reference(gate_up, down, first, x, weights, ids)
    out = experts(x, weights, ids)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    torch_path = RoutedExperts(gate_up, down, first, compiled=False)
    assert ((torch_path(x, weights, ids).double() - ref).norm() / ref.norm()).item() < 1e-2
    # The shared expert's output added as the sum is written: the sum rounded to bf16, then added.
    shared = torch.randn(tokens, hidden).bfloat16()
    assert torch.equal(experts(x, weights, ids, add=shared), (out.float() + shared.float()).bfloat16())
    off_rank = torch.full_like(ids, first + local)  # every choice on another rank's experts
    assert torch.equal(experts(x, weights, off_rank), torch.zeros_like(x))
    assert torch.equal(experts(x, weights, off_rank, add=shared), shared)


@each_variant("moe")
def test_compiled_experts_leave_the_kernel_when_moved_or_cast(monkeypatch, variant):
    """The kernel reads bf16 host memory: moved to another device (`meta` stands in for CUDA) or
    cast to float32, the experts take the torch path, on the same weights."""
    hidden, inter = 128, 64
    use_variant(monkeypatch, "moe", variant)
    gate_up = torch.randn(4, 2 * inter, hidden).bfloat16()
    down = torch.randn(4, hidden, inter).bfloat16()
    moved = RoutedExperts(gate_up, down, 0).to("meta")
    assert not moved.compiled and moved.gate_up_t.shape == (4, hidden, 2 * inter) and moved.gate_up_t.is_meta
    cast = RoutedExperts(gate_up, down, 0).float()
    assert not cast.compiled
    assert torch.equal(cast.gate_up_t, gate_up.transpose(1, 2).float())
    assert torch.equal(cast.down_t, down.transpose(1, 2).float())
    x, weights, ids = torch.randn(9, hidden), torch.rand(9, K), torch.randint(0, 4, (9, K))
    assert cast(x, weights, ids).shape == (9, hidden)
    gate_up_strips, down_strips = (native.pack_strips(w, native.EXPERT_STRIP) for w in (gate_up, down))
    with pytest.raises(ValueError, match="host memory"):
        native.moe_routed(torch.zeros(1, hidden, device="meta"), torch.ones(1, K), torch.zeros(1, K, dtype=torch.int64),
                          0, gate_up_strips, down_strips)
    with pytest.raises(ValueError, match="do not fit"):
        native.moe_routed(torch.zeros(2, hidden).bfloat16(), torch.ones(3, K), torch.zeros(3, K, dtype=torch.int64),
                          0, gate_up_strips, down_strips)


@pytest.mark.parametrize("experts,groups,top_groups,k", [(32, 4, 2, 4), (256, 8, 4, 8), (16, 1, 1, 3)])
@each_variant("gate")
def test_compiled_gate_matches_reference(monkeypatch, variant, experts, groups, top_groups, k):
    """The router on bf16 hidden states (the CPU path's dtype) picks the same experts, best first,
    with the same weights as the torch definition: the small checkpoint's shape, DeepSeek-V3's
    (256 experts in 8 groups, 4 kept, top-8), and a single group."""
    use_variant(monkeypatch, "gate", variant)
    from types import SimpleNamespace

    from model.moe import Gate
    torch.manual_seed(experts)
    cfg = SimpleNamespace(n_routed_experts=experts, n_group=groups, topk_group=top_groups, num_experts_per_tok=k,
                          norm_topk_prob=experts != 16, routed_scaling_factor=2.5)
    hidden = 200  # not a multiple of any vector width
    gate = Gate(cfg, torch.randn(experts, hidden) / 10, torch.randn(experts) / 10)
    for tokens in (1, 37, 300):
        x = torch.randn(tokens + 3, hidden).bfloat16()[3:]  # a view: rows start past the storage's start
        weights, ids = gate(x)
        ref_weights, ref_ids = gate.reference(x)
        assert ids.dtype == torch.int64 and weights.dtype == torch.float32
        assert torch.equal(ids, ref_ids)
        assert torch.allclose(weights, ref_weights, rtol=1e-5, atol=1e-6)


@each_variant("gate")
def test_compiled_gate_refuses_what_it_cannot_take(monkeypatch, variant):
    use_variant(monkeypatch, "gate", variant)
    w, b = torch.randn(64, 32), torch.randn(32)  # weight transposed: [hidden, E]
    with pytest.raises(ValueError, match="want bf16 x"):
        native.moe_gate(torch.randn(4, 64), w, b, 4, 2, 4, True, 1.0)
    with pytest.raises(RuntimeError, match="refused 32 experts in 5 groups"):
        native.moe_gate(torch.randn(4, 64).bfloat16(), w, b, 5, 2, 4, True, 1.0)
