"""Engine options as command-line flags, derived from their one declaration (engine/config.py:
EngineConfig's fields, each with its default and help): `--max-num-seqs`, `--kv-cache-dtype`, ...;
a bool that defaults to False is `--x`, one that defaults to True is `--no-x` (or its declared flag)."""

from __future__ import annotations

import argparse
import dataclasses

from engine.config import EngineConfig

_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float, "str | None": str}


def engine_options() -> list[dataclasses.Field]:
    """EngineConfig's fields but the model directory (each command has its own --model)."""
    return [f for f in dataclasses.fields(EngineConfig) if f.name != "model_dir"]


def _flag(f: dataclasses.Field) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def add_engine_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("engine options")
    added = [f for f in engine_options() if f.name not in exclude]
    parser.set_defaults(engine_options=[f.name for f in added])  # what engine_config reads back
    for f in added:
        help_text = f.metadata.get("help", "").replace("%", "%%")
        if f.type == "bool":
            group.add_argument(_flag(f), dest=f.name, action="store_false" if f.default else "store_true",
                               help=help_text)
            continue
        if f.type not in _TYPES:
            raise TypeError(f"EngineConfig.{f.name}: no flag for a {f.type} option")
        choices = f.metadata.get("choices")
        shown = "" if f.default is None else f" (default: {f.default})"
        group.add_argument(_flag(f), dest=f.name, type=_TYPES[f.type], default=f.default,
                           choices=list(choices) if choices else None, help=help_text + shown)


def engine_config(args: argparse.Namespace, model_dir: str, **overrides) -> EngineConfig:
    """The EngineConfig the parsed flags give (an option a command left out keeps its default)."""
    values = {name: getattr(args, name) for name in args.engine_options}
    return EngineConfig(model_dir=model_dir, **{**values, **overrides})


def model_dir_of(args: argparse.Namespace) -> str:
    """--model, or the embedded demo model (trained on first use)."""
    if args.model:
        return args.model
    from model.demo_checkpoint import default_model_dir

    return str(default_model_dir())
