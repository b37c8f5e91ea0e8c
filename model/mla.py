"""Multi-head Latent Attention over the paged latent cache.

Per token: queries  h -> q_a_proj -> q_a_layernorm -> q_b_proj -> [H, nope | rope]
           latent   h -> kv_a_proj_with_mqa -> [c_kv (kv_lora_rank) | k_pe (rope)]
q_a_proj and kv_a_proj_with_mqa read the same input, so they run as one linear over their stacked
weights (as SGLang's fused_qkv_a_proj_with_mqa): one activation quantization and one GEMM launch.
The cache keeps kv_a_layernorm(c_kv) and rope(k_pe). Attention runs in the absorbed form:
W_UK (the key half of kv_b_proj) is folded into the queries and W_UV (the value half) is applied
to the latent output, so keys and values are never expanded per head.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from engine.model_config import ModelConfig
from kernels.attention_plan import AttentionPlan, OutputRows
from kernels.cache_write import write_latent_entries
from kernels.mla_attention import absorbed_cpu_layout, mla_attention
from model.layers import Linear, RMSNorm, StackedLinear
from model.rope import RotaryEmbedding


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], prefix: str):
        super().__init__()
        self.cfg = cfg
        p = prefix + ".self_attn."
        if cfg.q_lora_rank:
            self.qkv_a_proj = StackedLinear(w, [p + "q_a_proj.weight", p + "kv_a_proj_with_mqa.weight"])
            self.q_a_layernorm = RMSNorm(w[p + "q_a_layernorm.weight"], cfg.rms_norm_eps)
            self.q_b_proj = Linear.load(w, p + "q_b_proj.weight")
        else:
            self.q_proj = Linear.load(w, p + "q_proj.weight")
            self.kv_a_proj_with_mqa = Linear.load(w, p + "kv_a_proj_with_mqa.weight")
        self.kv_a_layernorm = RMSNorm(w[p + "kv_a_layernorm.weight"], cfg.rms_norm_eps)
        self.o_proj = Linear.load(w, p + "o_proj.weight")
        heads, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        kv_b = w[p + "kv_b_proj.weight"].view(heads, nope + v, cfg.kv_lora_rank)
        self.w_uk = nn.Parameter(kv_b[:, :nope].contiguous(), requires_grad=False)  # [H, nope, kv_lora_rank]
        self.w_uv = nn.Parameter(kv_b[:, nope:].contiguous(), requires_grad=False)  # [H, v, kv_lora_rank]

    @cached_property
    def head_strips(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """kernels/mla_attention.py: absorbed_cpu_layout, made on the first call."""
        return absorbed_cpu_layout(self.w_uk, self.w_uv)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                cache: torch.Tensor, plan: AttentionPlan, rope: RotaryEmbedding,
                out_rows: OutputRows | None = None) -> torch.Tensor:
        """`out_rows`: the rows whose output is wanted (None: all); the output projection runs
        over those alone, and attention too where out_rows has a plan of its own."""
        cfg = self.cfg
        t = x.shape[0]
        if cfg.q_lora_rank:
            q_a, kv_a = self.qkv_a_proj.parts(x)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
            c_kv, k_pe = kv_a.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        else:
            q = self.q_proj(x)
            c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        q = q.view(t, cfg.num_attention_heads, cfg.qk_head_dim)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        q_pe = write_latent_entries(c_kv, k_pe, q_pe, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps,
                                    rope.rotations, positions, slot_mapping, cache)

        if out_rows is not None and not len(out_rows.index):
            return x.new_empty(0, x.shape[1])  # (only the cache entries were wanted)
        if out_rows is not None and out_rows.plan is not None:
            q_nope, q_pe, plan = q_nope[out_rows.index], q_pe[out_rows.index], out_rows.plan
        o = mla_attention(q_nope, q_pe, cache, plan, self.w_uk, self.w_uv, cfg.softmax_scale,
                          self.head_strips)  # [T or R, H, v]
        o = o.reshape(o.shape[0], -1)
        if out_rows is not None and out_rows.plan is None:
            o = o[out_rows.index]
        return self.o_proj(o)
