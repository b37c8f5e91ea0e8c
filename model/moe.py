"""DeepSeek-V3 mixture of experts: noaux_tc grouped routing, routed experts, one shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model_config import ModelConfig
from kernels import native
from kernels.backend import batch_invariant
from kernels.batch_invariant import dense_bmm, dense_linear
from kernels.fused_moe import fused_moe
from kernels.moe_router import select_experts, select_experts_ref
from model.expert_parallel import ExpertParallel
from model.layers import DenseMLP, fuse_gate_up_fp8


class Gate(nn.Module):
    """Sigmoid scores; selection by score + correction bias within the best groups; weights
    are the unbiased scores of the chosen experts (normalized) times routed_scaling_factor.
    bf16 on the CPU runs the compiled kernel (kernels/csrc/moe_gate_cpu.cpp); elsewhere the linear
    runs in float32 and kernels/moe_router.py selects."""

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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if x.dim() == 2 and native.runs("gate", x):
            return native.moe_gate(x, self.weight_t, self.e_score_correction_bias, cfg.n_group, cfg.topk_group,
                                   cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor)
        return select_experts(dense_linear(x.float(), self.weight), self.e_score_correction_bias, cfg.n_group,
                              cfg.topk_group, cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor)

    def reference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        return select_experts_ref(F.linear(x.float(), self.weight), self.e_score_correction_bias, cfg.n_group,
                                  cfg.topk_group, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                                  cfg.routed_scaling_factor)


class RoutedExperts(nn.Module):
    """This rank's experts [first, first + n), stacked. With FP8 weights (scales given) the fused
    MoE kernel runs them all in two grouped GEMMs. With dequantized bf16 weights on a CPU with AMX
    the compiled kernel (kernels/csrc/moe_cpu.cpp) runs them, on weights stored once in the tiles'
    layout (1.9-2.1x the torch path below at 256 and 2048 tokens). Otherwise tokens
    are laid out per expert in rows padded to the busiest expert's count, and two batched matmuls
    run every expert at once (1.7-4.7x faster than a matmul per expert on the CPU from 8 to 2048
    tokens, even with 3x padding: a call on a few dozen rows costs more in overhead than in
    arithmetic). Only when routing is so skewed that the padding costs more than those calls
    does each expert run one matmul over its contiguous rows."""

    # One matmul call per expert costs about as much as this many padded rows (measured on the
    # CPU, 512 hidden: ~150 us per call, ~1.5 us per padded row through both products).
    ROWS_PER_CALL = 100

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, first_expert: int,
                 gate_up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None,
                 compiled: bool | None = None):
        super().__init__()
        self.first_expert = first_expert
        self.fp8 = gate_up_scale is not None
        _, two_inter, hidden = gate_up.shape
        if compiled is None:  # the compiled AMX kernel where it runs (kernels/csrc/moe_cpu.cpp)
            compiled = (not self.fp8 and gate_up.device.type == "cpu"
                        and native.moe_experts_available(gate_up.dtype, hidden, two_inter // 2))
        self.compiled = compiled
        if self.compiled:  # stored as the tiles read them: 64-column strips of row pairs
            self.gate_up_pairs = nn.Parameter(native.pack_strips(gate_up, native.EXPERT_STRIP), requires_grad=False)
            self.down_pairs = nn.Parameter(native.pack_strips(down, native.EXPERT_STRIP), requires_grad=False)
        elif self.fp8:
            self.gate_up = nn.Parameter(gate_up, requires_grad=False)  # [n, 2 * inter, hidden]
            self.down = nn.Parameter(down, requires_grad=False)  # [n, hidden, inter]
            self.gate_up_scale = nn.Parameter(gate_up_scale, requires_grad=False)
            self.down_scale = nn.Parameter(down_scale, requires_grad=False)
        else:  # stored as the batched matmuls read them
            self.gate_up_t = nn.Parameter(gate_up.transpose(1, 2).contiguous(), requires_grad=False)  # [n, hidden, 2I]
            self.down_t = nn.Parameter(down.transpose(1, 2).contiguous(), requires_grad=False)  # [n, inter, hidden]

    def _apply(self, fn, recurse=True):
        """Moved to another device or cast to another dtype (`.to(...)`), the experts leave the
        compiled kernel, which reads bf16 host memory, for the torch path and its layout."""
        super()._apply(fn, recurse)
        if self.compiled and (self.gate_up_pairs.device.type != "cpu" or self.gate_up_pairs.dtype != torch.bfloat16):
            self.gate_up_t = nn.Parameter(native.unpack_strips(self.gate_up_pairs).transpose(1, 2).contiguous(),
                                          requires_grad=False)
            self.down_t = nn.Parameter(native.unpack_strips(self.down_pairs).transpose(1, 2).contiguous(),
                                       requires_grad=False)
            del self.gate_up_pairs, self.down_pairs
            self.compiled = False
        return self

    @property
    def num_local(self) -> int:
        return (self.gate_up_pairs if self.compiled else self.gate_up if self.fp8 else self.gate_up_t).shape[0]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                add: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, hidden]; ids, weights [T, k] (global expert ids). Returns Σ_k w·expert(x) over
        the choices that fall on this rank's experts, plus `add` when given (the compiled kernel
        adds it as it writes the sum)."""
        if self.compiled:
            return native.moe_routed(x, weights, ids, self.first_expert, self.gate_up_pairs, self.down_pairs, add)
        if self.fp8:
            out = fused_moe(x, self.gate_up, self.gate_up_scale, self.down, self.down_scale, weights, ids,
                            self.first_expert)
        else:
            out = self._batched(x, weights, ids)
        return out if add is None else out + add

    def _batched(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        t, k = ids.shape
        n = self.num_local
        local = ids.flatten() - self.first_expert
        on_rank = (local >= 0) & (local < n)
        key = torch.where(on_rank, local, n)  # choices for other ranks' experts sort last
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=n + 1)
        per_expert = counts[:n].tolist()
        width = max(per_expert)
        if width == 0:
            return torch.zeros_like(x)
        padding = n * width - sum(per_expert)
        if padding > self.ROWS_PER_CALL * sum(c > 0 for c in per_expert) and not batch_invariant():
            return self._per_expert(x, weights, order, per_expert, k)
        # Choice order[i] goes to row i - start(expert) of its expert's padded slab.
        sorted_key = key[order]
        starts = counts.cumsum(0) - counts
        padded_row = sorted_key * width + torch.arange(order.numel(), device=x.device) - starts[sorted_key]
        on = sorted_key < n
        src = torch.zeros(n * width, dtype=torch.long, device=x.device)  # padding rows compute token 0, unused
        src[padded_row[on]] = order[on] // k
        h = dense_bmm(x.index_select(0, src).view(n, width, -1), self.gate_up_t)
        gate, up = h.chunk(2, dim=-1)
        out = dense_bmm(F.silu(gate) * up, self.down_t).view(n * width, -1)
        back = torch.zeros(t * k, dtype=torch.long, device=x.device)  # other ranks' choices: weight 0
        back[order[on]] = padded_row[on]
        w = torch.where(on_rank.view(t, k), weights, 0).to(x.dtype)
        return dense_bmm(w.view(t, 1, k), out.index_select(0, back).view(t, k, -1)).view(t, -1)

    def _per_expert(self, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, counts: list[int],
                    k: int) -> torch.Tensor:
        order = order[: sum(counts)]  # this rank's choices, sorted by expert
        rows = x.index_select(0, order // k)
        w = weights.flatten()[order].to(x.dtype)[:, None]
        out = torch.empty_like(rows)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            gate, up = (rows[start : start + c] @ self.gate_up_t[e]).chunk(2, dim=-1)
            # The routing weight is applied as the result is written: a separate pass over all
            # rows cost as much as the experts' matmuls at 2K tokens.
            torch.mul((F.silu(gate) * up) @ self.down_t[e], w[start : start + c], out=out[start : start + c])
            start += c
        return torch.zeros_like(x).index_add_(0, order // k, out)


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
