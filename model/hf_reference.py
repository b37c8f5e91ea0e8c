"""The peer implementation: transformers' DeepseekV3ForCausalLM with the same dequantized weights.

Used by parity tests and benchmarks only; the engine never runs it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.model_config import ModelConfig
from model.loader import load_weights


def _layer_state(cfg: ModelConfig, w: dict[str, torch.Tensor], i: int, prefix: str) -> dict[str, torch.Tensor]:
    """Published names of layer i -> transformers' names under `prefix` (experts fused)."""
    src = f"model.layers.{i}."
    sd = {prefix + n[len(src):]: t for n, t in w.items()
          if n.startswith(src) and ".mlp.experts." not in n}
    if cfg.is_moe_layer(i):
        p = src + "mlp.experts"
        experts = range(cfg.n_routed_experts)
        sd[prefix + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([w[f"{p}.{e}.gate_proj.weight"], w[f"{p}.{e}.up_proj.weight"]]) for e in experts])
        sd[prefix + "mlp.experts.down_proj"] = torch.stack([w[f"{p}.{e}.down_proj.weight"] for e in experts])
    return sd


def hf_state_dict(cfg: ModelConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published per-expert names -> transformers' fused expert tensors; MTP layers dropped."""
    sd = {n: t for n, t in w.items() if not n.startswith("model.layers.")}
    for i in range(cfg.num_hidden_layers):
        sd.update(_layer_state(cfg, w, i, f"model.layers.{i}."))
    return sd


def load_hf_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig, DeepseekV3ForCausalLM

    cfg = ModelConfig.from_checkpoint(model_dir)
    hf_cfg = AutoConfig.from_pretrained(str(model_dir))
    if hasattr(hf_cfg, "quantization_config"):
        del hf_cfg.quantization_config  # weights arrive dequantized
    hf_cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(hf_cfg)
    sd = hf_state_dict(cfg, load_weights(model_dir, cfg, dtype, include_mtp=False))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"transformers model did not take the weights: missing {missing}, unexpected {unexpected}")
    # Buffers that are not in the state dict (rotary frequencies) must be materialized.
    model.model.rotary_emb.__init__(hf_cfg)
    return model.to(dtype).eval()


class ReferenceMTP(torch.nn.Module):
    """DeepSeek-V3's MTP module in plain torch around transformers' decoder layer: the reference
    the engine's MTP is checked against (no peer implements MTP), and the training twin's head."""

    def __init__(self, hf_cfg):
        super().__init__()
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

        h, eps = hf_cfg.hidden_size, hf_cfg.rms_norm_eps
        self.enorm = DeepseekV3RMSNorm(h, eps=eps)
        self.hnorm = DeepseekV3RMSNorm(h, eps=eps)
        self.eh_proj = torch.nn.Linear(2 * h, h, bias=False)
        self.layer = DeepseekV3DecoderLayer(hf_cfg, hf_cfg.num_hidden_layers)
        self.shared_head_norm = DeepseekV3RMSNorm(h, eps=eps)

    @staticmethod
    def _run(layers, x: torch.Tensor, config, rotary) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        pos = torch.arange(x.shape[1], device=x.device)[None]
        mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None, past_key_values=None,
                                  position_ids=pos)
        pe = rotary(x, pos)
        for layer in layers:
            x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        return x

    def forward(self, main, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """main: the transformers DeepseekV3ForCausalLM; input_ids [B, T]. Returns the main model's
        logits [B, T, V] and the MTP logits [B, T-1, V], where position t predicts token t+2
        from the main hidden state at t and token t+1."""
        m = main.model
        emb = m.embed_tokens(input_ids)
        h = self._run(m.layers, emb, m.config, m.rotary_emb)
        logits = main.lm_head(m.norm(h))
        x = self.eh_proj(torch.cat([self.enorm(emb[:, 1:]), self.hnorm(h[:, :-1])], dim=-1))
        hm = self._run([self.layer], x, m.config, m.rotary_emb)
        return logits, main.lm_head(self.shared_head_norm(hm))

    def published_state(self, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """This module's tensors under the checkpoint's names (experts split per expert)."""
        L = cfg.num_hidden_layers
        p = f"model.layers.{L}."
        out = {}
        for name, t in self.state_dict().items():
            if name.startswith("layer.mlp.experts."):
                continue
            name = name.replace("shared_head_norm.", "shared_head.norm.")
            out[p + name.removeprefix("layer.")] = t
        experts = self.layer.mlp.experts
        inter = cfg.moe_intermediate_size
        for e in range(cfg.n_routed_experts):
            out[f"{p}mlp.experts.{e}.gate_proj.weight"] = experts.gate_up_proj[e, :inter]
            out[f"{p}mlp.experts.{e}.up_proj.weight"] = experts.gate_up_proj[e, inter:]
            out[f"{p}mlp.experts.{e}.down_proj.weight"] = experts.down_proj[e]
        return out


def load_hf_model_with_mtp(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(transformers main model, ReferenceMTP) with the checkpoint's dequantized weights."""
    cfg = ModelConfig.from_checkpoint(model_dir)
    main = load_hf_model(model_dir, dtype)
    with torch.device("meta"):
        mtp = ReferenceMTP(main.config)
    w = load_weights(model_dir, cfg, dtype, include_mtp=True)
    L = cfg.num_hidden_layers
    sd = _layer_state(cfg, w, L, "layer.")
    for ours, theirs in (("enorm.", "layer.enorm."), ("hnorm.", "layer.hnorm."), ("eh_proj.", "layer.eh_proj."),
                         ("shared_head_norm.", "layer.shared_head.norm.")):
        sd[ours + "weight"] = sd.pop(theirs + "weight")
    missing, unexpected = mtp.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"reference MTP did not take the weights: missing {missing}, unexpected {unexpected}")
    return main, mtp.to(dtype).eval()
