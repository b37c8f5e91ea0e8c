"""The peer implementation: transformers' DeepseekV3ForCausalLM with the same dequantized weights.

Used by parity tests and benchmarks only; the engine never runs it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.model_config import ModelConfig
from model.loader import load_weights


def hf_state_dict(cfg: ModelConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published per-expert names -> transformers' fused expert tensors; MTP layers dropped."""
    sd: dict[str, torch.Tensor] = {}
    for name, t in w.items():
        if ".mlp.experts." in name:
            continue
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) >= cfg.num_hidden_layers:
            continue
        sd[name] = t
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        experts = range(cfg.n_routed_experts)
        sd[p + ".gate_up_proj"] = torch.stack(
            [torch.cat([w[f"{p}.{e}.gate_proj.weight"], w[f"{p}.{e}.up_proj.weight"]]) for e in experts]
        )
        sd[p + ".down_proj"] = torch.stack([w[f"{p}.{e}.down_proj.weight"] for e in experts])
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
