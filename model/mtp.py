"""DeepSeek-V3's multi-token-prediction module, used as the draft model of speculative decoding.

At position t it combines the main model's last hidden state h_t (before the final norm) with the
embedding of token t+1 and predicts token t+2:

    x = eh_proj([enorm(embed(token_{t+1})) ; hnorm(h_t)])
    h'_t = decoder_layer(x)            (its own MLA over its own latent cache layer, and a MoE)
    logits = head(shared_head.norm(h'_t))

Embedding and head are the main model's (the checkpoint's per-module copies are identical).
Chaining feeds h'_t back in as the hidden state of the next position, which is how one module
drafts k > 1 tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model_config import ModelConfig
from kernels.attention_plan import OutputRows
from kernels.forward_batch import ForwardBatch
from model.deepseek_v3 import DecoderLayer, DeepseekV3
from model.layers import Linear, RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], main: DeepseekV3,
                 experts: range | None = None):
        super().__init__()
        if cfg.num_nextn_predict_layers < 1:
            raise ValueError("the checkpoint has no MTP module (num_nextn_predict_layers is 0)")
        self.layer_idx = cfg.num_hidden_layers
        p = f"model.layers.{self.layer_idx}"
        experts = experts if experts is not None else range(cfg.n_routed_experts)  # (with main.ep: its slots')
        self.enorm = RMSNorm(w[p + ".enorm.weight"], cfg.rms_norm_eps)
        self.hnorm = RMSNorm(w[p + ".hnorm.weight"], cfg.rms_norm_eps)
        self.eh_proj = Linear.load(w, p + ".eh_proj.weight")
        self.layer = DecoderLayer(cfg, w, self.layer_idx, experts, main.ep)
        self.head_norm = RMSNorm(w[p + ".shared_head.norm.weight"], cfg.rms_norm_eps)
        # Shared, not owned: the main model's embedding, head, rope tables and gather buffer.
        self._main = [main]

    @property
    def main(self) -> DeepseekV3:
        return self._main[0]

    def forward(self, batch: ForwardBatch, prev_hidden: torch.Tensor, cache: torch.Tensor,
                next_ids: torch.Tensor | None = None, out_rows: OutputRows | None = None) -> torch.Tensor:
        """next_ids[i] (default batch.input_ids[i]) is the token after the one whose hidden
        state is prev_hidden[i]; writes the module's latent entries at batch's slots; returns
        its hidden states (pre-norm), of the rows `out_rows` (None: all). A batch the main model
        ran keeps its attention plan."""
        main = self.main
        plan = main.plan(batch)
        e = self.enorm(F.embedding(batch.input_ids if next_ids is None else next_ids, main.embed_tokens))
        x = self.eh_proj(torch.cat([e, self.hnorm(prev_hidden)], dim=-1))
        out, residual = self.layer(x, batch, cache, plan, main.rope, out_rows=out_rows)
        return out + residual

    def idle_forward(self) -> None:
        """A pass without tokens on this rank (expert parallelism): serve the others' choices."""
        self.layer.mlp(self.main.embed_tokens.new_empty(0, self.main.cfg.hidden_size))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.main.lm_head(self.head_norm(hidden)).float()
