"""The model's architecture, read once from a checkpoint's config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be served as it is: the message names what is wrong and where."""


@dataclass(frozen=True)
class YarnRope:
    theta: float
    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    num_nextn_predict_layers: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: YarnRope | None
    rope_theta: float
    bos_token_id: int | None
    eos_token_id: int | None
    fp8_block: tuple[int, int] | None  # weight_block_size of quantization_config, None if unquantized

    @property
    def kv_entry_dim(self) -> int:
        """Values per token per layer in the latent cache: normalized latent, then rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_cache_layers(self) -> int:
        """Layers holding a latent cache: the main stack plus the MTP modules."""
        return self.num_hidden_layers + self.num_nextn_predict_layers

    @property
    def softmax_scale(self) -> float:
        # YaRN sharpens attention by mscale(factor, mscale_all_dim)^2, as the reference does.
        scale = self.qk_head_dim**-0.5
        if self.rope is not None and self.rope.mscale_all_dim and self.rope.factor > 1:
            m = 0.1 * self.rope.mscale_all_dim * math.log(self.rope.factor) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        def need(key: str) -> Any:
            if key not in raw:
                raise CheckpointError(f"{source}: missing field '{key}'")
            return raw[key]

        rope, rope_theta = _rope_of(raw, source)
        fp8_block = _fp8_block_of(raw, source)
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if raw.get("scoring_func", "sigmoid") != "sigmoid" or raw.get("topk_method", "noaux_tc") != "noaux_tc":
            raise CheckpointError(f"{source}: only sigmoid scoring with noaux_tc routing is supported")
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            moe_intermediate_size=need("moe_intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=need("num_attention_heads"),
            q_lora_rank=raw.get("q_lora_rank"),
            kv_lora_rank=need("kv_lora_rank"),
            qk_nope_head_dim=need("qk_nope_head_dim"),
            qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
            n_routed_experts=need("n_routed_experts"),
            n_shared_experts=raw.get("n_shared_experts", 1),
            num_experts_per_tok=need("num_experts_per_tok"),
            n_group=raw.get("n_group", 1),
            topk_group=raw.get("topk_group", 1),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
            first_k_dense_replace=raw.get("first_k_dense_replace", 0),
            num_nextn_predict_layers=raw.get("num_nextn_predict_layers", 0),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=need("max_position_embeddings"),
            rope=rope,
            rope_theta=rope_theta,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos,
            fp8_block=fp8_block,  # type: ignore[arg-type]
        )

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: no config.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(raw, source=str(path))


def _rope_of(raw: dict[str, Any], source: str) -> tuple[YarnRope | None, float]:
    """The rope scaling (YaRN, or None for plain rope) and theta, from either config spelling."""
    rope_raw = raw.get("rope_scaling") or raw.get("rope_parameters")
    rope_theta = float(raw.get("rope_theta", (rope_raw or {}).get("rope_theta", 10000.0)))
    rope = None
    if rope_raw and (rope_raw.get("type") or rope_raw.get("rope_type")) == "yarn":
        rope = YarnRope(
            theta=rope_theta,
            factor=float(rope_raw["factor"]),
            original_max_position_embeddings=int(rope_raw["original_max_position_embeddings"]),
            beta_fast=float(rope_raw.get("beta_fast", 32)),
            beta_slow=float(rope_raw.get("beta_slow", 1)),
            mscale=float(rope_raw.get("mscale", 1.0)),
            mscale_all_dim=float(rope_raw.get("mscale_all_dim", 0.0)),
        )
    elif rope_raw and (rope_raw.get("type") or rope_raw.get("rope_type")) not in (None, "default"):
        raise CheckpointError(f"{source}: rope_scaling type {rope_raw} is not supported (yarn only)")
    return rope, rope_theta


def _fp8_block_of(raw: dict[str, Any], source: str) -> tuple[int, int] | None:
    """The weights' FP8 block shape, or None for an unquantized checkpoint."""
    quant = raw.get("quantization_config")
    fp8_block = None
    if quant:
        if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
            raise CheckpointError(f"{source}: quantization_config {quant} is not fp8 e4m3")
        fp8_block = tuple(quant.get("weight_block_size", [128, 128]))
    return fp8_block
