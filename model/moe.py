"""DeepSeek-V3 mixture of experts: noaux_tc grouped routing, routed experts, one shared expert."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from engine.model_config import ModelConfig
from kernels.moe_router import route, route_ref
from kernels.routed_experts import RoutedExperts
from model.expert_parallel import ExpertParallel, replica_table
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
    """`experts` are the routed experts this rank holds, one per slot; with expert parallelism
    (`ep`) the other ranks hold the rest and token choices travel to them and back. With EPLB
    (`ep.balanced`) an expert may have replicas in several slots, and each token's choice of it
    goes to one of them (model/expert_parallel.py)."""

    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], prefix: str, experts: Sequence[int],
                 ep: ExpertParallel | None = None, layer_idx: int | None = None):
        super().__init__()
        self.ep = ep
        self.layer_idx = layer_idx
        # Choices routed to each expert (from this rank's tokens), for the load metric.
        self.register_buffer("routed_tokens", torch.zeros(cfg.n_routed_experts, dtype=torch.int64), persistent=False)
        self.placement: list[int] | None = None
        if ep is not None and ep.balanced:
            self.placement = ep.placement(layer_idx)
            table, count = replica_table(self.placement, cfg.n_routed_experts, ep.num_slots - cfg.n_routed_experts + 1,
                                         ep.slots_per_rank, ep.rank)
            self.register_buffer("replica_slots", table, persistent=False)
            self.register_buffer("replica_count", count, persistent=False)
            # Choices each slot received (from this rank's tokens): the ranks' real loads.
            self.register_buffer("slot_tokens", torch.zeros(ep.num_slots, dtype=torch.int64), persistent=False)
        first_slot = ep.first_slot if ep is not None else experts[0]
        p = prefix + ".mlp."
        self.gate = Gate(cfg, w[p + "gate.weight"], w[p + "gate.e_score_correction_bias"])
        names = [tuple(f"{p}experts.{e}.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")) for e in experts]
        if names[0][0] + "_scale_inv" in w:
            fused = [fuse_gate_up_fp8(*(t for n in trio for t in (w[n], w[n + "_scale_inv"]))) for trio in names]
            gate_up, gate_up_s, down, down_s = (torch.stack(parts) for parts in zip(*fused))
            self.experts = RoutedExperts(gate_up, down, first_slot, gate_up_s, down_s)
        else:
            gate_up = torch.stack([torch.cat([w[g], w[u]]) for g, u, _ in names])
            down = torch.stack([w[d] for _, _, d in names])
            self.experts = RoutedExperts(gate_up, down, first_slot)
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
        if self.placement is not None:
            ids = self._to_slots(ids)
            self.slot_tokens.index_add_(0, ids.flatten(), counted)
        if self.ep is None:
            return self.experts(x, weights, ids, add=self.shared_experts(x))
        return self.ep.dispatch_combine(x, weights, ids, self.experts) + self.shared_experts(x)

    def reset_load(self) -> None:
        self.routed_tokens.zero_()
        if self.placement is not None:
            self.slot_tokens.zero_()

    def _to_slots(self, ids: torch.Tensor) -> torch.Tensor:
        """Logical expert ids [T, k] -> slot ids: a choice of an expert with a replica on this rank
        goes to it; else token t's choice of an expert with c replicas goes to replica
        (t + rank) mod c, so its tokens split evenly among them (the rank offset: one-token steps
        of several ranks do not all pick the first). model/expert_parallel.py: replica_table."""
        ids = ids.long()
        token = torch.arange(ids.shape[0], device=ids.device)[:, None] + self.ep.rank
        return self.replica_slots[ids, token % self.replica_count[ids]]

    def set_placement(self, placement: list[int]) -> None:
        """Switches this layer to `placement` (every rank at once, between two steps): moves the
        expert weights whose slots change and rewrites the replica table in place."""
        self.ep.move_experts(list(self.experts.parameters()), self.placement, placement)
        table, count = replica_table(placement, len(self.replica_count), self.replica_slots.shape[1],
                                     self.ep.slots_per_rank, self.ep.rank)
        self.replica_slots.copy_(table)
        self.replica_count.copy_(count)
        self.placement = list(placement)
