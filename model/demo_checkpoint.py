"""Where the embedded demo model lives, and how it comes to exist.

The trained checkpoint (a few MB) is committed under assets/demo, made by
`mlaserve train-demo assets/demo` (model/demo_trainer.py). When it is missing (a checkout without
it, or an install that did not ship it) the first use trains it, with a progress bar, into the
user's cache directory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo"
DEFAULT_SEED = 0


def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.json", "model.safetensors.index.json", "tokenizer.json",
                                               "demo_training.json"))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlaserve" / f"demo-seed{DEFAULT_SEED}"


def default_model_dir() -> Path:
    """The demo checkpoint: the committed one, else a cached one, else trained now."""
    for path in (ASSET_DIR, cache_dir()):
        if _complete(path):
            return path
    print(f"mlaserve: the embedded demo model is not built yet; training it into {cache_dir()} "
          "(a few minutes on 2 CPU cores, once)", file=sys.stderr)
    return train_demo(cache_dir(), DEFAULT_SEED)


def train_demo(out_dir: Path, seed: int = DEFAULT_SEED, steps: int | None = None) -> Path:
    from tqdm import tqdm

    from model.demo_trainer import DEFAULT_STEPS, train, write_checkpoint

    steps = steps or DEFAULT_STEPS
    tmp = out_dir.with_name(out_dir.name + ".partial")
    with tqdm(total=steps, desc="training the demo model", unit="step") as bar:
        def progress(step: int, loss: float, mtp_loss: float) -> None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", mtp_loss=f"{mtp_loss:.3f}")

        raw, main, mtp, meta = train(seed, steps, progress=progress)
    write_checkpoint(raw, main, mtp, tmp, meta)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)  # a crash mid-write never leaves a half checkpoint that looks complete
    return out_dir


def training_meta(model_dir: Path) -> dict | None:
    f = Path(model_dir) / "demo_training.json"
    return json.loads(f.read_text()) if f.is_file() else None
