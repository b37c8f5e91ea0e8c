"""Reads a published-layout checkpoint: config, shard index, and only the tensors asked for.

Every tensor is checked against the spec (present, shape, dtype, scale shape) and FP8 weights are
dequantized once here, so the CPU path computes in `dtype` from then on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from engine.model_config import CheckpointError, ModelConfig
from model.fp8 import FP8_DTYPE, dequantize_weight
from model.weight_spec import TensorSpec, layer_specs, scale_inv_shape, top_level_specs

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def read_weight_map(model_dir: Path) -> dict[str, str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            return json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
    single = model_dir / "model.safetensors"
    if single.is_file():
        with _open_shard(single) as f:
            return {name: single.name for name in f.keys()}
    raise CheckpointError(f"{model_dir}: neither model.safetensors.index.json nor model.safetensors")


def _open_shard(path: Path):
    if not path.is_file():
        raise CheckpointError(f"shard file {path.name} is missing from {path.parent}")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise CheckpointError(f"shard file {path.name} cannot be read (truncated or corrupt?): {e}") from e


def model_specs(cfg: ModelConfig, experts: range | Callable[[int], Iterable[int]] | None = None,
                include_mtp: bool = True) -> list[TensorSpec]:
    """`experts`: the routed experts to read, the same for every layer or per layer index."""
    specs = list(top_level_specs(cfg))
    last = cfg.num_cache_layers if include_mtp else cfg.num_hidden_layers
    for i in range(last):
        specs.extend(layer_specs(cfg, i, experts(i) if callable(experts) else experts))
    return specs


class ShardReader:
    """Open shards (once each) and fetch checked tensors by name."""

    def __init__(self, model_dir: Path, weight_map: dict[str, str]):
        self.model_dir = model_dir
        self.weight_map = weight_map
        self._stack = ExitStack()
        self._files: dict[str, object] = {}

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _file_of(self, name: str):
        fname = self.weight_map.get(name)
        if fname is None:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint (not in the shard index)")
        if fname not in self._files:
            self._files[fname] = self._stack.enter_context(_open_shard(self.model_dir / fname))
        return fname, self._files[fname]

    def get(self, name: str, shape: tuple[int, ...], dtypes: Iterable[torch.dtype]) -> torch.Tensor:
        fname, f = self._file_of(name)
        if name not in f.keys():  # type: ignore[attr-defined]
            raise CheckpointError(f"tensor {name} is missing from {fname} (the index names that file)")
        try:
            t = f.get_tensor(name)  # type: ignore[attr-defined]
        except Exception as e:
            raise CheckpointError(f"tensor {name} in {fname} cannot be read: {e}") from e
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {name} has shape {list(t.shape)}, expected {list(shape)} (file {fname})"
            )
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}, expected {want} (file {fname})")
        return t


# The FP8 kernels take 128x128 weight blocks; other block sizes are dequantized at load.
KERNEL_FP8_BLOCK = (128, 128)


def _keeps_fp8(spec: TensorSpec) -> bool:
    # kv_b_proj is split into the absorbed W_UK / W_UV, which are used in the compute dtype.
    return not spec.name.endswith("kv_b_proj.weight")


def _load_one(reader: ShardReader, spec: TensorSpec, cfg: ModelConfig, dtype: torch.dtype,
              keep_fp8: bool) -> dict[str, torch.Tensor]:
    if spec.kind == "fp8" and cfg.fp8_block is not None:
        q = reader.get(spec.name, spec.shape, (FP8_DTYPE,))
        scale_name = spec.name + "_scale_inv"
        s = reader.get(scale_name, scale_inv_shape(spec.shape, cfg.fp8_block), (torch.float32,))
        if keep_fp8 and _keeps_fp8(spec):
            return {spec.name: q, scale_name: s}
        return {spec.name: dequantize_weight(q, s, cfg.fp8_block, dtype)}
    t = reader.get(spec.name, spec.shape, _FLOAT_DTYPES)
    # The router's correction bias stays float32 whatever the compute dtype, as the reference keeps it.
    return {spec.name: t.float() if spec.kind == "f32" else t.to(dtype)}


def load_weights(
    model_dir: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype = torch.bfloat16,
    experts: range | Callable[[int], Iterable[int]] | None = None,
    include_mtp: bool = True,
    keep_fp8: bool = False,
) -> dict[str, torch.Tensor]:
    """Tensors by published name; `experts` limits routed experts to one EP rank's (per layer
    index, when a function: EPLB's placements differ between layers). FP8 weights
    are dequantized to `dtype`, unless `keep_fp8` (the GPU kernels' path): then they stay e4m3 and
    their `<name>_scale_inv` comes along."""
    model_dir = Path(model_dir)
    keep_fp8 = keep_fp8 and cfg.fp8_block == KERNEL_FP8_BLOCK
    weight_map = read_weight_map(model_dir)
    out: dict[str, torch.Tensor] = {}
    with ShardReader(model_dir, weight_map) as reader:
        for spec in model_specs(cfg, experts, include_mtp):
            out.update(_load_one(reader, spec, cfg, dtype, keep_fp8))
    return out
