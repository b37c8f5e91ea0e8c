"""DeepSeek-V3's routed experts, one entry point over their implementations: each token's top-k
experts' SwiGLU MLPs, weighted by the router and summed (Σ_k w·expert(x)). The layout the
weights are stored in is the implementation's, chosen once when the layer is made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import native
from kernels.backend import batch_invariant
from kernels.batch_invariant import dense_bmm
from kernels.fused_moe import fused_moe


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
