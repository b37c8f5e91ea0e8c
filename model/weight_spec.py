"""Which tensors a DeepSeek-V3 checkpoint holds, with their published names, shapes and kinds.

The checkpoint maker writes exactly these and the loader checks against them, so the two
cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from engine.model_config import ModelConfig

# fp8: e4m3 weight with a float32 `<name>_scale_inv` block scale beside it (bf16 in an unquantized
# checkpoint); bf16: a float tensor kept in high precision; f32: kept in float32.
TensorKind = Literal["fp8", "bf16", "f32"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: TensorKind


def scale_inv_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    out_features, in_features = shape
    return (-(-out_features // block[0]), -(-in_features // block[1]))


def _attention(cfg: ModelConfig, p: str) -> Iterator[TensorSpec]:
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank:
        yield TensorSpec(f"{p}.self_attn.q_a_proj.weight", (cfg.q_lora_rank, h), "fp8")
        yield TensorSpec(f"{p}.self_attn.q_a_layernorm.weight", (cfg.q_lora_rank,), "bf16")
        yield TensorSpec(f"{p}.self_attn.q_b_proj.weight", (heads * cfg.qk_head_dim, cfg.q_lora_rank), "fp8")
    else:
        yield TensorSpec(f"{p}.self_attn.q_proj.weight", (heads * cfg.qk_head_dim, h), "fp8")
    yield TensorSpec(f"{p}.self_attn.kv_a_proj_with_mqa.weight", (cfg.kv_entry_dim, h), "fp8")
    yield TensorSpec(f"{p}.self_attn.kv_a_layernorm.weight", (cfg.kv_lora_rank,), "bf16")
    kv_b_out = heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    yield TensorSpec(f"{p}.self_attn.kv_b_proj.weight", (kv_b_out, cfg.kv_lora_rank), "fp8")
    yield TensorSpec(f"{p}.self_attn.o_proj.weight", (h, heads * cfg.v_head_dim), "fp8")


def _mlp(p: str, hidden: int, inter: int) -> Iterator[TensorSpec]:
    yield TensorSpec(f"{p}.gate_proj.weight", (inter, hidden), "fp8")
    yield TensorSpec(f"{p}.up_proj.weight", (inter, hidden), "fp8")
    yield TensorSpec(f"{p}.down_proj.weight", (hidden, inter), "fp8")


def layer_specs(cfg: ModelConfig, layer_idx: int, experts: Iterable[int] | None = None) -> Iterator[TensorSpec]:
    """Tensors of decoder layer `layer_idx` (an MTP layer when >= num_hidden_layers).

    `experts` restricts the routed experts to one expert-parallel rank's share (each once, in
    the order given, however many of the rank's slots hold it).
    """
    h = cfg.hidden_size
    p = f"model.layers.{layer_idx}"
    yield TensorSpec(f"{p}.input_layernorm.weight", (h,), "bf16")
    yield TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), "bf16")
    yield from _attention(cfg, p)
    if cfg.is_moe_layer(layer_idx):
        yield TensorSpec(f"{p}.mlp.gate.weight", (cfg.n_routed_experts, h), "bf16")
        yield TensorSpec(f"{p}.mlp.gate.e_score_correction_bias", (cfg.n_routed_experts,), "f32")
        for e in dict.fromkeys(experts) if experts is not None else range(cfg.n_routed_experts):
            yield from _mlp(f"{p}.mlp.experts.{e}", h, cfg.moe_intermediate_size)
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        yield from _mlp(f"{p}.mlp.shared_experts", h, shared)
    else:
        yield from _mlp(f"{p}.mlp", h, cfg.intermediate_size)
    if layer_idx >= cfg.num_hidden_layers:
        yield TensorSpec(f"{p}.enorm.weight", (h,), "bf16")
        yield TensorSpec(f"{p}.hnorm.weight", (h,), "bf16")
        yield TensorSpec(f"{p}.eh_proj.weight", (h, 2 * h), "bf16")
        yield TensorSpec(f"{p}.shared_head.norm.weight", (h,), "bf16")


def mtp_copies(cfg: ModelConfig, layer_idx: int) -> Iterator[TensorSpec]:
    """The published checkpoint stores copies of the embedding and head with each MTP layer."""
    p = f"model.layers.{layer_idx}"
    yield TensorSpec(f"{p}.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size), "bf16")
    yield TensorSpec(f"{p}.shared_head.head.weight", (cfg.vocab_size, cfg.hidden_size), "bf16")


def top_level_specs(cfg: ModelConfig) -> Iterator[TensorSpec]:
    yield TensorSpec("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size), "bf16")
    yield TensorSpec("model.norm.weight", (cfg.hidden_size,), "bf16")
    yield TensorSpec("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), "bf16")


def checkpoint_specs(cfg: ModelConfig) -> Iterator[TensorSpec]:
    """Every tensor of the full checkpoint, main model and MTP layers."""
    yield from top_level_specs(cfg)
    for i in range(cfg.num_cache_layers):
        yield from layer_specs(cfg, i)
        if i >= cfg.num_hidden_layers:
            yield from mtp_copies(cfg, i)
