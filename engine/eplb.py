"""Expert-parallel load balancing (EPLB), the scheduler process's side: which logical expert each
physical slot of each MoE layer holds, from the measured load (engine/expert_load.py's window,
engine/eplb_placement.py's algorithm), re-placed every `eplb_interval_steps` steps; and the load
file a restarted engine starts balanced from.

Placing one of DeepSeek-V3's 58 MoE layers takes 0.5-9 ms in Python (eplb_placement.py: the
packing 0.3-0.4 ms, keeping slots in place 0.25 ms at 8 ranks, 9 ms at 64): all at once they would
stall one step by up to half a second, so layers are placed for PLACEMENT_BUDGET_S a step (at
least one), from a snapshot of the window. Each placed layer whose placement changed switches
with a later step, SWITCH_LAYERS_PER_STEP a step (every rank's plan carries it; the workers move
its experts before running that step): the moves of a re-placement are spread over as many steps.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from engine.config import EngineConfig
from engine.eplb_placement import Placement, keep_in_place, place_layer_by_host
from engine.model_config import ModelConfig

# Time a step spends placing layers while a re-placement is being computed (one layer at least).
PLACEMENT_BUDGET_S = 0.002
# MoE layers that switch to their new placement per step (SGLang's rebalance layers per chunk): a
# step waits for its switch's weight moves, so a re-placement's moves are spread over steps.
SWITCH_LAYERS_PER_STEP = 1
LOAD_FILE_FORMAT = "mlaserve-expert-load/1"
# A load file of DeepSeek-V3 (58 layers x 256 experts of int counts) is ~150 KB; far larger is not one.
MAX_LOAD_FILE_BYTES = 64 << 20


def moe_layers(cfg: ModelConfig, include_mtp: bool) -> list[int]:
    """The MoE layers' indices, in the workers' order (the MTP layer's last)."""
    last = cfg.num_cache_layers if include_mtp else cfg.num_hidden_layers
    return [i for i in range(last) if cfg.is_moe_layer(i)]


def read_load_file(path: str | Path, layers: list[int], num_experts: int) -> dict[int, np.ndarray] | None:
    """Counts per MoE layer from an earlier run's file; None when there is no file yet (the engine
    writes it at shutdown). A layer the file lacks (the MTP layer of a run without speculation)
    is left out. A file that is not one raises ValueError naming what is wrong."""
    path = Path(path)
    if not path.exists():
        return None
    where = f"eplb_load_file {str(path)!r}"
    if not path.is_file() or path.stat().st_size > MAX_LOAD_FILE_BYTES:
        raise ValueError(f"{where} is not a file of at most {MAX_LOAD_FILE_BYTES} bytes")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{where} is not readable JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != LOAD_FILE_FORMAT:
        raise ValueError(f"{where} is not an expert load file (format {LOAD_FILE_FORMAT!r})")
    if doc.get("num_experts") != num_experts:
        raise ValueError(f"{where} counts {doc.get('num_experts')!r} routed experts per layer; this model has "
                         f"{num_experts}")
    counts = doc.get("layers")
    if not isinstance(counts, dict):
        raise ValueError(f"{where}: 'layers' must map MoE layer indices to counts")
    out: dict[int, np.ndarray] = {}
    for key, row in counts.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) in layers):
            raise ValueError(f"{where}: {key!r} is not one of this model's MoE layers {layers}")
        if (not isinstance(row, list) or len(row) != num_experts
                or not all(type(n) is int and 0 <= n < 1 << 62 for n in row)):
            raise ValueError(f"{where}: layer {key} must have {num_experts} counts, integers >= 0")
        out[int(key)] = np.asarray(row, dtype=np.int64)
    return out


def write_load_file(path: str | Path, counts: dict[int, np.ndarray], num_experts: int) -> None:
    """Written whole or not at all (a temporary file renamed over the old one)."""
    path = Path(path)
    doc = {"format": LOAD_FILE_FORMAT, "num_experts": num_experts,
           "layers": {str(layer): [int(n) for n in row] for layer, row in sorted(counts.items())}}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def initial_placements(config: EngineConfig, cfg: ModelConfig) -> dict[int, list[int]] | None:
    """Per MoE layer the slots' experts an engine starts with: placed from the load file's counts
    where it has them, else from an even load. None without EPLB (the static ranges)."""
    if not config.enable_eplb:
        return None
    layers = moe_layers(cfg, config.num_speculative_tokens > 0)
    # (a file may hold the MTP layer's load where this run does not draft, or lack it)
    loads = read_load_file(config.eplb_load_file, moe_layers(cfg, True), cfg.n_routed_experts) \
        if config.eplb_load_file else None
    even = np.ones(cfg.n_routed_experts)
    return {layer: place_for(loads.get(layer, even) if loads else even, config, cfg).slot_expert for layer in layers}


def place_for(load, config: EngineConfig, cfg: ModelConfig) -> Placement:
    """A layer's placement from its load: by host (expert groups to hosts first) with nnodes > 1."""
    return place_layer_by_host(load, config.ep_size, config.num_redundant_experts, config.nnodes, cfg.n_group)


class ExpertBalancer:
    """Owns the current placement; every interval steps computes the next one from the window
    and hands it out a layer at a time."""

    def __init__(self, config: EngineConfig, cfg: ModelConfig):
        self.config, self.cfg = config, cfg
        self.num_ranks = config.ep_size
        self.interval = config.eplb_interval_steps
        self.num_experts = cfg.n_routed_experts
        self.num_slots = cfg.n_routed_experts + config.num_redundant_experts
        self.layers = moe_layers(cfg, config.num_speculative_tokens > 0)
        self.placements = initial_placements(config, cfg)
        self._steps = 0
        self._snapshot: np.ndarray | None = None  # [layers, experts] the re-placement in progress reads
        self._placed = 0  # layers of it placed so far
        self._ready: list[tuple[int, list[int]]] = []  # placed layers whose placement changed, not yet sent
        self._counted = False  # whether this re-placement has sent a layer yet
        self.rebalances = 0
        self.moved_slots = 0

    def on_step(self, window_counts: np.ndarray | None) -> dict[int, list[int]] | None:
        """Called for each step sent to the workers, with the window's [MoE layers, experts]
        counts; returns the layers whose placement this step switches, if any."""
        self._steps += 1
        if self._snapshot is None and not self._ready:
            if self._steps < self.interval or window_counts is None or window_counts.shape[0] != len(self.layers):
                return None
            self._steps, self._placed, self._counted = 0, 0, False
            self._snapshot = window_counts.copy()
        if self._snapshot is not None:
            self._place_some()
        if not self._ready:
            return None
        switch, self._ready = self._ready[:SWITCH_LAYERS_PER_STEP], self._ready[SWITCH_LAYERS_PER_STEP:]
        for layer, slots in switch:
            self.moved_slots += sum(a != b for a, b in zip(self.placements[layer], slots))
            self.placements[layer] = slots
        if not self._counted:
            self.rebalances += 1
            self._counted = True
        return dict(switch)

    def _place_some(self) -> None:
        """Layers of the re-placement in progress, for PLACEMENT_BUDGET_S (one at least)."""
        started, first = time.perf_counter(), self._placed
        while self._placed < len(self.layers):
            if self._placed > first and time.perf_counter() - started > PLACEMENT_BUDGET_S:
                return
            layer = self.layers[self._placed]
            p = keep_in_place(self.placements[layer], place_for(self._snapshot[self._placed], self.config, self.cfg),
                              self.config.nnodes)
            p.check(self.num_experts, self.num_ranks)
            if p.slot_expert != self.placements[layer]:
                self._ready.append((layer, p.slot_expert))
            self._placed += 1
        self._snapshot = None
