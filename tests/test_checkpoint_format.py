"""The maker writes the published layout; FP8 round-trips; the loader refuses broken checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.model_config import CheckpointError, ModelConfig
from entrypoints.cli import main as cli_main
from model.fp8 import FP8_DTYPE, dequantize_weight, quantize_weight
from model.loader import load_weights
from model.weight_spec import checkpoint_specs, scale_inv_shape

# The published DeepSeek-V3 config.json, fields that determine tensor shapes.
V3_CONFIG = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "first_k_dense_replace": 3, "num_nextn_predict_layers": 1, "max_position_embeddings": 163840,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}


def test_scale_inv_shapes_match_published_v3():
    cfg = ModelConfig.from_dict(V3_CONFIG)
    fp8 = {s.name: scale_inv_shape(s.shape, (128, 128)) for s in checkpoint_specs(cfg) if s.kind == "fp8"}
    a = "model.layers.3.self_attn."
    assert fp8[a + "q_a_proj.weight"] == (12, 56)
    assert fp8[a + "q_b_proj.weight"] == (192, 12)
    assert fp8[a + "kv_a_proj_with_mqa.weight"] == (5, 56)
    assert fp8[a + "kv_b_proj.weight"] == (256, 4)
    assert fp8[a + "o_proj.weight"] == (56, 128)
    assert fp8["model.layers.0.mlp.down_proj.weight"] == (56, 144)
    assert fp8["model.layers.0.mlp.gate_proj.weight"] == (144, 56)
    assert fp8["model.layers.60.mlp.experts.255.down_proj.weight"] == (56, 16)
    assert fp8["model.layers.61.mlp.shared_experts.gate_proj.weight"] == (16, 56)
    assert cfg.kv_entry_dim == 576 and cfg.num_cache_layers == 62


def test_fp8_round_trip_within_e4m3_precision():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0)) * 0.05  # edge blocks partial
    q, s = quantize_weight(w)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (3, 2)
    back = dequantize_weight(q, s)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, plus the subnormal step.
    block_scale = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    assert torch.all((back - w).abs() <= w.abs() * 2**-4 + block_scale * 2**-9)
    assert (back - w).abs().max() > 0  # it really was quantized


def test_maker_writes_published_layout(tiny_checkpoint):
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    assert raw["quantization_config"]["weight_block_size"] == [128, 128]
    assert raw["rope_scaling"]["type"] == "yarn" and raw["num_nextn_predict_layers"] == 1
    assert raw["first_k_dense_replace"] >= 1 and raw["n_group"] > 1 and raw["topk_group"] > 1
    assert raw["kv_lora_rank"] == 512 and raw["qk_rope_head_dim"] == 64
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert shards == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    cfg = ModelConfig.from_checkpoint(tiny_checkpoint)
    mtp = cfg.num_hidden_layers
    for name in (f"model.layers.{mtp}.eh_proj.weight", f"model.layers.{mtp}.shared_head.head.weight",
                 f"model.layers.{mtp}.enorm.weight", f"model.layers.{mtp}.mlp.experts.0.up_proj.weight"):
        assert name in index
    with safe_open(str(tiny_checkpoint / index["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
        s = f.get_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv")
    assert w.dtype == FP8_DTYPE and w.shape == (576, 256) and s.shape == (5, 2)  # 576 is not a multiple of 128


def test_tokenizer_encodes_any_text(tiny_checkpoint):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    text = "12+34=46\n\tΩ≈ç√ 日本語 🙂"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text and max(ids) < 258


def test_cli_make_checkpoint_is_deterministic(tmp_path):
    assert cli_main(["make-checkpoint", "--preset", "tiny", "--seed", "5", str(tmp_path / "a")]) == 0
    assert cli_main(["make-checkpoint", "--preset", "tiny", "--seed", "5", str(tmp_path / "b")]) == 0
    a = load_file(str(tmp_path / "a" / "model-00001-of-00003.safetensors"))
    b = load_file(str(tmp_path / "b" / "model-00001-of-00003.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, out)
    return out


def _rewrite_shard(ckpt, tensor_name, edit):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    shard = ckpt / index[tensor_name]
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard))
    return shard.name


def test_missing_tensor_is_named(broken):
    name = "model.layers.2.mlp.experts.7.up_proj.weight"
    shard = _rewrite_shard(broken, name, lambda t: t.pop(name))
    cfg = ModelConfig.from_checkpoint(broken)
    with pytest.raises(CheckpointError, match=rf"{name} is missing from {shard}"):
        load_weights(broken, cfg)


def test_tensor_missing_from_index_is_named(broken):
    path = broken / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    del index["weight_map"]["model.norm.weight"]
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is missing from the checkpoint"):
        load_weights(broken, ModelConfig.from_checkpoint(broken))


def test_wrong_shape_is_named_with_file(broken):
    name = "model.layers.1.self_attn.q_a_proj.weight_scale_inv"
    shard = _rewrite_shard(broken, name, lambda t: t.__setitem__(name, torch.ones(2, 3)))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[2, 3\], expected \[2, 2\] \(file {shard}\)"):
        load_weights(broken, ModelConfig.from_checkpoint(broken))


def test_wrong_dtype_is_named(broken):
    name = "model.layers.0.self_attn.o_proj.weight"
    _rewrite_shard(broken, name, lambda t: t.__setitem__(name, t[name].float()))
    with pytest.raises(CheckpointError, match=rf"{name} has dtype torch.float32, expected float8_e4m3fn"):
        load_weights(broken, ModelConfig.from_checkpoint(broken))


def test_truncated_shard_is_named(broken):
    shard = broken / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors cannot be read"):
        load_weights(broken, ModelConfig.from_checkpoint(broken))


def test_loader_reads_only_one_ranks_experts(tiny_checkpoint):
    cfg = ModelConfig.from_checkpoint(tiny_checkpoint)
    w = load_weights(tiny_checkpoint, cfg, torch.float32, experts=range(4, 8))
    experts = {int(n.split(".")[5]) for n in w if ".mlp.experts." in n}
    assert experts == {4, 5, 6, 7}
