"""DeepSeek-V3 mixture of experts: noaux_tc grouped routing, routed experts, one shared expert."""

from __future__ import annotations

import torch
from torch import nn

from engine.model_config import ModelConfig
from kernels.moe_router import route, route_ref
from kernels.routed_experts import RoutedExperts
from model.expert_parallel import ExpertParallel
from model.layers import DenseMLP, fuse_gate_up_fp8


class Gate(nn.Module):
    """Sigmoid scores; selection by score + correction bias within the best groups; weights
    are the unbiased scores of the chosen experts (normalized) times routed_scaling_factor.
    kernels/moe_router.py: route runs it."""

    def __init__(self, cfg: ModelConfig, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        # Stored transposed, [hidden, E]: the compiled router reads a row of every expert's weights
        # for each hidden dim.
        self.weight_t = nn.Parameter(weight.float().t().contiguous(), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(bias.float(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # [E, hidden]
        return self.weight_t.t()

    def _args(self) -> tuple:
        cfg = self.cfg
        return (self.weight_t, self.e_score_correction_bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok,
                cfg.norm_topk_prob, cfg.routed_scaling_factor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(x, *self._args())

    def reference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route_ref(x, *self._args())


class MoE(nn.Module):
    """`experts` are the routed experts this rank holds; with expert parallelism (`ep`) the other
    ranks hold the rest and token choices travel to them and back."""

    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], prefix: str, experts: range,
                 ep: ExpertParallel | None = None):
        super().__init__()
        self.ep = ep
        # Choices routed to each expert (from this rank's tokens), for the load metric.
        self.register_buffer("routed_tokens", torch.zeros(cfg.n_routed_experts, dtype=torch.int64), persistent=False)
        p = prefix + ".mlp."
        self.gate = Gate(cfg, w[p + "gate.weight"], w[p + "gate.e_score_correction_bias"])
        names = [tuple(f"{p}experts.{e}.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")) for e in experts]
        if names[0][0] + "_scale_inv" in w:
            fused = [fuse_gate_up_fp8(*(t for n in trio for t in (w[n], w[n + "_scale_inv"]))) for trio in names]
            gate_up, gate_up_s, down, down_s = (torch.stack(parts) for parts in zip(*fused))
            self.experts = RoutedExperts(gate_up, down, experts.start, gate_up_s, down_s)
        else:
            gate_up = torch.stack([torch.cat([w[g], w[u]]) for g, u, _ in names])
            down = torch.stack([w[d] for _, _, d in names])
            self.experts = RoutedExperts(gate_up, down, experts.start)
        sp = p + "shared_experts."
        self.shared_experts = DenseMLP(w, sp)

    def forward(self, x: torch.Tensor, real_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """`real_tokens` [T] (1 or 0): which rows the routing metric counts (padding rows of a
        CUDA graph's batch are not); None: all."""
        weights, ids = self.gate(x)
        # index_add_, not bincount: bincount sizes its output from the largest id, a host sync on
        # CUDA (one per MoE layer, which stalls the launch queue) that a CUDA graph cannot capture.
        if real_tokens is None:
            counted = ids.new_ones(ids.numel(), dtype=torch.long)
        else:
            counted = real_tokens[:, None].expand(ids.shape).flatten()
        self.routed_tokens.index_add_(0, ids.flatten().long(), counted)
        if self.ep is None:
            return self.experts(x, weights, ids, add=self.shared_experts(x))
        return self.ep.dispatch_combine(x, weights, ids, self.experts) + self.shared_experts(x)
