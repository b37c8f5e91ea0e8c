"""DeepSeek-V3 over a flat batch of tokens and the paged latent cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model_config import ModelConfig
from kernels.attention_plan import AttentionPlan, GatherBuffer, OutputRows, plan_attention
from kernels.forward_batch import ForwardBatch
from model.expert_parallel import ExpertParallel
from model.layers import DenseMLP, Linear, RMSNorm
from model.mla import MLA
from model.moe import MoE
from model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], layer_idx: int, experts: range,
                 ep: ExpertParallel | None = None):
        super().__init__()
        p = f"model.layers.{layer_idx}"
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(w[p + ".input_layernorm.weight"], cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(w[p + ".post_attention_layernorm.weight"], cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, w, p)
        self.mlp: nn.Module
        if cfg.is_moe_layer(layer_idx):
            local = ep.local_experts(layer_idx) if ep is not None else experts
            self.mlp = MoE(cfg, w, p, local, ep, layer_idx)
        else:
            m = p + ".mlp."
            self.mlp = DenseMLP(w, m)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: torch.Tensor, plan: AttentionPlan,
                rope: RotaryEmbedding, residual: torch.Tensor | None = None,
                out_rows: OutputRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's input is x + residual (x alone without one); returns (mlp output, residual),
        whose sum is its output: each residual add happens inside the next norm (as vLLM's layers).
        `out_rows`: the rows whose output is wanted, in that order (None: all); every row still
        writes its cache entries, and the rest of the layer runs over those alone."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        a = self.self_attn(h, batch.positions, batch.slot_mapping, cache, plan, rope, out_rows)
        real = batch.real_tokens
        if out_rows is not None:
            residual = residual[out_rows.index]
            real = real[out_rows.index] if real is not None else None
        h, residual = self.post_attention_layernorm(a, residual)
        if isinstance(self.mlp, MoE):
            return self.mlp(h, real), residual
        return self.mlp(h), residual


class DeepseekV3(nn.Module):
    """The main model. Layer i uses latent cache layer i."""

    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], experts: range | None = None,
                 max_positions: int | None = None, ep: ExpertParallel | None = None,
                 prefill_expand_limit: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.ep = ep
        # The most context tokens a step's prefill chunks expand to per-head keys and values at once
        # (kernels/mla_attention.py); None: no limit.
        self.prefill_expand_limit = prefill_expand_limit
        experts = experts if experts is not None else range(cfg.n_routed_experts)  # (with `ep`: its slots')
        self.embed_tokens = nn.Parameter(w["model.embed_tokens.weight"], requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, w, i, experts, ep) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(w["model.norm.weight"], cfg.rms_norm_eps)
        self.lm_head = Linear.load(w, "lm_head.weight")
        self.rope = RotaryEmbedding(cfg, max_positions, device=self.embed_tokens.device)
        self.gather_buffer = GatherBuffer()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def forward(self, batch: ForwardBatch, cache_layers: list[torch.Tensor],
                plan: AttentionPlan | None = None) -> torch.Tensor:
        """Writes every token's latent entries into the cache; returns the last layer's hidden
        states before the final norm, [T, hidden] (the MTP module reads these). `plan`: the
        attention plan when the caller made it (a CUDA graph's, over static buffers)."""
        if plan is None:
            plan = self.plan(batch)
        x, residual = F.embedding(batch.input_ids, self.embed_tokens), None
        for layer in self.layers:
            x, residual = layer(x, batch, cache_layers[layer.layer_idx], plan, self.rope, residual)
        return x + residual

    def plan(self, batch: ForwardBatch) -> AttentionPlan:
        """The batch's attention plan, made once and kept on it (the MTP layer's first pass runs
        over the same batch)."""
        if batch.plan is None:
            batch.plan = plan_attention(batch, self.embed_tokens, self.gather_buffer, self.prefill_expand_limit)
        return batch.plan

    def idle_forward(self) -> None:
        """A step without tokens on this rank: it still serves the other ranks' expert choices,
        layer by layer, in the order a real forward would."""
        empty = self.embed_tokens.new_empty(0, self.cfg.hidden_size)
        for layer in self.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp(empty)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (pre-norm) -> float32 logits [N, vocab]."""
        return self.lm_head(self.norm(hidden)).float()
