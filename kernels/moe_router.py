"""DeepSeek-V3's expert selection (`noaux_tc`) from the router's logits:

    scores = sigmoid(logits); biased = scores + e_score_correction_bias
    each group of experts scored by the sum of its two best biased scores; the best `topk_group`
    groups kept; the `top_k` best biased scores among their experts chosen;
    weights = the chosen experts' unbiased scores (normalized to sum 1 with `norm_topk_prob`)
              * routed_scaling_factor

`select_experts`: a Triton kernel where Triton runs (one program per token, the whole selection in
registers), the torch reference elsewhere (15 launches on a GPU). `route`, the router's entry
point, runs the router's linear and the selection: on a CPU that runs the compiled gate in one
pass (kernels/cpu/gate.py), elsewhere a float32 linear and `select_experts`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import native
from kernels.backend import triton_wanted
from kernels.batch_invariant import dense_linear


def select_experts_ref(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
                       norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `select_experts`, in plain torch."""
    scores = logits.float().sigmoid()  # [T, E]
    biased = scores + bias
    grouped = biased.view(-1, n_group, biased.shape[-1] // n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
    keep = group_scores.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    biased = biased.masked_fill(~group_mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
    ids = biased.topk(top_k, dim=-1).indices  # [T, k]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


@triton.jit
def _first_max(values, index, NONE: tl.constexpr):
    """The largest value and the smallest index holding it (topk's order for ties)."""
    best = tl.max(values, 0)
    return best, tl.min(tl.where(values == best, index, NONE), 0)


@triton.jit
def _select_experts_kernel(logits_ptr, logits_stride, bias_ptr, weights_ptr, ids_ptr, scaling,
                           N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr,
                           TOP_K: tl.constexpr, NORM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    group = tl.arange(0, BLOCK_G)
    slot = tl.arange(0, BLOCK_S)
    live = (group[:, None] < N_GROUP) & (slot[None, :] < GROUP_SIZE)
    expert = group[:, None] * GROUP_SIZE + slot[None, :]  # [BLOCK_G, BLOCK_S]
    logit = tl.load(logits_ptr + t * logits_stride + expert, mask=live, other=0.0).to(tl.float32)
    score = tl.math.div_rn(1.0, 1.0 + tl.exp(-logit))
    biased = tl.where(live, score + tl.load(bias_ptr + expert, mask=live, other=0.0), float("-inf"))

    # Each group's two best, summed: the best, then the best of the rest.
    first = tl.max(biased, 1)
    first_at = tl.min(tl.where(biased == first[:, None], slot[None, :], BLOCK_S), 1)
    second = tl.max(tl.where(slot[None, :] == first_at[:, None], float("-inf"), biased), 1)
    group_score = tl.where(group < N_GROUP, first + second, float("-inf"))
    kept = tl.zeros([BLOCK_G], dtype=tl.int1)
    for _ in tl.static_range(TOPK_GROUP):
        _, g = _first_max(group_score, group, BLOCK_G)
        kept = kept | (group == g)
        group_score = tl.where(group == g, float("-inf"), group_score)

    candidates = tl.where(kept[:, None], biased, float("-inf"))
    flat_candidates = tl.reshape(candidates, [BLOCK_G * BLOCK_S])
    # Padding slots get no expert id: theirs would repeat the next group's.
    flat_expert = tl.reshape(tl.where(live, expert, -1), [BLOCK_G * BLOCK_S])
    flat_score = tl.reshape(score, [BLOCK_G * BLOCK_S])
    k = tl.arange(0, BLOCK_K)
    chosen = tl.zeros([BLOCK_K], dtype=tl.int64)
    weight = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i in tl.static_range(TOP_K):
        _, e = _first_max(flat_candidates, flat_expert, BLOCK_G * GROUP_SIZE)
        chosen = tl.where(k == i, e.to(tl.int64), chosen)
        weight = tl.where(k == i, tl.sum(tl.where(flat_expert == e, flat_score, 0.0), 0), weight)
        flat_candidates = tl.where(flat_expert == e, float("-inf"), flat_candidates)
    if NORM:
        weight = tl.math.div_rn(weight, tl.sum(weight, 0) + 1e-20)
    tl.store(weights_ptr + t * TOP_K + k, weight * scaling, mask=k < TOP_K)
    tl.store(ids_ptr + t * TOP_K + k, chosen, mask=k < TOP_K)


def block_sizes(n_experts: int, n_group: int, top_k: int) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_S, BLOCK_K): groups, experts per group and choices, padded to powers of two."""
    return (triton.next_power_of_2(n_group), triton.next_power_of_2(n_experts // n_group),
            triton.next_power_of_2(top_k))


def select_experts(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
                   norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (the router's linear, float32), bias [E] -> (weights [T, top_k] float32,
    expert ids [T, top_k] int64), best first."""
    if not triton_wanted(logits):
        return select_experts_ref(logits, bias, n_group, topk_group, top_k, norm_topk_prob, scaling)
    tokens, n_experts = logits.shape
    if n_experts % n_group or logits.stride(-1) != 1:
        raise ValueError(f"select_experts: {n_experts} experts in {n_group} groups, logits {tuple(logits.shape)}")
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    if tokens:
        _select_experts_kernel[(tokens,)](
            logits, logits.stride(0), bias.float().contiguous(), weights, ids, float(scaling),
            n_group, n_experts // n_group, topk_group, top_k, norm_topk_prob, *block_sizes(n_experts, n_group, top_k),
            num_warps=4)
    return weights, ids


def route(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
          norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, hidden]; weight_t the router's weight transposed [hidden, E] (float32, as the compiled
    gate reads it); bias [E] float32 -> (weights [T, k] float32, ids [T, k] int64)."""
    if x.dim() == 2 and native.runs("gate", x):
        return native.moe_gate(x, weight_t, bias, n_group, topk_group, top_k, norm_topk_prob, scaling)
    return select_experts(dense_linear(x.float(), weight_t.t()), bias, n_group, topk_group, top_k, norm_topk_prob,
                          scaling)


def route_ref(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int,
              top_k: int, norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    return select_experts_ref(F.linear(x.float(), weight_t.t()), bias, n_group, topk_group, top_k, norm_topk_prob,
                              scaling)
