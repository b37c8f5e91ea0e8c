"""Writes random-weight checkpoints in the published DeepSeek-V3 layout (FP8, sharded, MTP layer).

Presets keep the real MLA cache geometry (kv_lora_rank 512 + qk_rope_head_dim 64 = 576 values per
token per layer) and shrink everything else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.model_config import ModelConfig
from model.fp8 import quantize_weight
from model.tokenizer_maker import TOKENIZER_VOCAB, write_tokenizer
from model.weight_spec import checkpoint_specs

_COMMON: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "moe_layer_freq": 1,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 1,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": TOKENIZER_VOCAB,
}

PRESETS: dict[str, dict[str, Any]] = {
    # A forward in milliseconds: for tests.
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 192,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "max_position_embeddings": 4096,
        "rope_scaling": {
            "type": "yarn",
            "factor": 16,
            "original_max_position_embeddings": 256,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
    # About 80M parameters: for benchmarks.
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 6,
        "first_k_dense_replace": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": 384,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
        "n_routed_experts": 32,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "max_position_embeddings": 8192,
        "rope_scaling": {
            "type": "yarn",
            "factor": 8,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
    # The embedded demo model (model/demo_trainer.py trains it): small enough to train on two CPU
    # cores in minutes, with the real MLA cache geometry, a MoE layer and the MTP module.
    "demo": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 2,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 128,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "max_position_embeddings": 512,  # the tool conversations are ~300 tokens
        "rope_scaling": {
            "type": "yarn",
            "factor": 8,
            "original_max_position_embeddings": 64,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
}

SHARDS = {"tiny": 3, "small": 4, "demo": 1}


def preset_config(preset: str) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return {**_COMMON, **PRESETS[preset]}


def random_weights(cfg: ModelConfig, seed: int, router_skew: float = 0.0) -> dict[str, torch.Tensor]:
    """Float32 weights scaled so activations stay O(1) and logits are well separated.
    `router_skew` > 0 tilts every router's e_score_correction_bias towards the lowest-numbered
    experts (by up to +-router_skew), so that routing is uneven on random weights, reproducibly:
    the static expert-parallel ranges then load rank 0 most (benchmarks of expert balancing)."""
    gen = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    for spec in checkpoint_specs(cfg):
        short = spec.name.rsplit(".", 2)[-2] + "." + spec.name.rsplit(".", 1)[-1]
        if short in ("embed_tokens.weight", "head.weight") and short in shared:
            weights[spec.name] = shared[short]  # MTP layers store copies of embedding and head
            continue
        if spec.name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(spec.shape, generator=gen)
        elif spec.name.endswith("e_score_correction_bias"):
            t = 0.05 * torch.randn(spec.shape, generator=gen)
            if router_skew:
                t += router_skew * torch.linspace(1.0, -1.0, spec.shape[0])
        elif spec.name.endswith("embed_tokens.weight"):
            t = torch.randn(spec.shape, generator=gen)
        else:
            t = torch.randn(spec.shape, generator=gen) / spec.shape[-1] ** 0.5
        weights[spec.name] = t
        if spec.name in ("model.embed_tokens.weight", "lm_head.weight"):
            shared["embed_tokens.weight" if "embed" in spec.name else "head.weight"] = t
    return weights


def encode_for_checkpoint(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float weights -> the stored tensors: FP8 + weight_scale_inv, bf16, or float32."""
    stored: dict[str, torch.Tensor] = {}
    for spec in checkpoint_specs(cfg):
        w = weights[spec.name]
        if spec.kind == "fp8" and cfg.fp8_block is not None:
            q, s = quantize_weight(w, cfg.fp8_block)
            stored[spec.name] = q
            stored[spec.name + "_scale_inv"] = s
        elif spec.kind == "f32":
            stored[spec.name] = w.float().contiguous()
        else:
            stored[spec.name] = w.to(torch.bfloat16).contiguous()
    return stored


def write_sharded(stored: dict[str, torch.Tensor], out_dir: Path, num_shards: int) -> None:
    """Splits tensors into shards of roughly equal size, keeping each weight beside its scale."""
    groups: list[list[str]] = []
    for name in stored:
        if name.endswith("_scale_inv"):
            continue
        group = [name] + ([name + "_scale_inv"] if name + "_scale_inv" in stored else [])
        groups.append(group)
    total = sum(t.numel() * t.element_size() for t in stored.values())
    target = total / num_shards
    shards: list[list[str]] = [[]]
    size = 0
    for group in groups:
        if size >= target and len(shards) < num_shards:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += sum(stored[n].numel() * stored[n].element_size() for n in group)
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: stored[n] for n in names}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_checkpoint(preset: str, seed: int, out_dir: str | Path, overrides: dict[str, Any] | None = None,
                    router_skew: float = 0.0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = {**preset_config(preset), **(overrides or {})}
    cfg = ModelConfig.from_dict(raw)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    stored = encode_for_checkpoint(cfg, random_weights(cfg, seed, router_skew))
    write_sharded(stored, out, SHARDS.get(preset, 3))
    write_tokenizer(out)
    return out


def ensure_checkpoint(out_dir: str | Path, preset: str = "small", seed: int = 0) -> Path:
    """The checkpoint in out_dir, made from the preset first if the folder holds none (benchmarks)."""
    out = Path(out_dir)
    if not (out / "config.json").exists():
        make_checkpoint(preset, seed, out)
    return out
