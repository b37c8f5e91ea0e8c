"""A decode step's forward, eager against replayed from its CUDA graph (engine/decode_graphs.py),
in one process on one GPU: the model of the checkpoint with its FP8 weights, every sequence with
--context cached tokens. Each side includes building its inputs from the step's sequences, as the
worker does. With --spec k, a speculative step instead: each sequence verifies k drafts (1 + k
rows), then the MTP layer's first pass over those rows and k - 1 chained passes over one row a
sequence (the MTP logits, outside the graphs, are left out of both). Needs a GPU.

    .venv/bin/python benchmarks/decode_graphs.py [--checkpoint DIR] [--batch 1 8 64 256] [--context 1024] [--spec 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# This folder holds kernels.py, which would shadow the kernels package: the repo root goes first.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from benchmarks.cpu_decode_attention import median_times
from cache.latent_cache import LatentCache
from engine.decode_graphs import CudaGraphReplay, DecodeGraphs
from engine.model_config import ModelConfig
from kernels.forward_batch import ForwardBatch, SequenceChunk
from model.deepseek_v3 import DeepseekV3
from model.loader import load_weights
from model.mtp import MTPModule


def step_functions(model, mtp, graphs, layers, b: int, k: int, context: int, per_seq: int, page: int):
    """(eager, replayed, the graph's size) of one step of b sequences: a decode, or with k drafts a
    verification and the drafting passes after it."""
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]
    chunks = [SequenceChunk([7] * (1 + k), context, t) for t in tables]
    chains = [[SequenceChunk([9], context + 1 + j, t) for t in tables] for j in range(k - 1)]
    size = graphs.size_for(chunks)
    ids = [8] * (b * (1 + k))
    last = torch.arange(k, b * (1 + k), 1 + k, device="cuda")  # each sequence's last row
    cache = layers[mtp.layer_idx] if mtp is not None else None

    def eager():
        batch = ForwardBatch.build(chunks, page, "cuda")
        hidden = model(batch, layers)
        if k:
            h = mtp(batch, hidden, cache, torch.tensor(ids, device="cuda"))[last]
            for chain in chains:
                h = mtp(ForwardBatch.build(chain, page, "cuda"), h, cache)
        torch.cuda.synchronize()

    def replay():
        graphs.run(chunks, size)
        if k:
            h = graphs.run_first_pass(ids)[last]
            for chain in chains:
                h = graphs.run_chained_pass(chain, h, graphs.size_for(chain))
        torch.cuda.synchronize()

    return eager, replay, size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="checkpoints/small-seed0")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--spec", type=int, default=0, help="drafts each sequence verifies (0: a plain decode step)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("decode_graphs: needs a GPU (CUDA graphs); none is visible")
        return
    from model.checkpoint_maker import ensure_checkpoint

    ckpt = ensure_checkpoint(args.checkpoint)
    cfg = ModelConfig.from_checkpoint(ckpt)
    k = args.spec
    weights = load_weights(ckpt, cfg, torch.bfloat16, include_mtp=k > 0, keep_fp8=True)
    model = DeepseekV3(cfg, weights, max_positions=args.context + 64).to("cuda")
    mtp = MTPModule(cfg, weights, model).to("cuda") if k else None
    page = args.block_size
    per_seq = -(-(args.context + 1 + k) // page)
    most = max(args.batch)
    cache = LatentCache(cfg.num_cache_layers, most * per_seq + 1, page, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                        torch.bfloat16, "cuda")
    layers = [cache.layer(i) for i in range(cfg.num_cache_layers)]
    began = time.perf_counter()
    pool = torch.cuda.graph_pool_handle()
    graphs = DecodeGraphs(model, layers, page, most, args.context + 1 + k, most * per_seq,
                          lambda: CudaGraphReplay(pool), mtp, 1 + k)
    print(f"{torch.cuda.get_device_name()}, {cfg.num_hidden_layers} layers, context {args.context}"
          f"{f', verifying {k} drafts and drafting {k}' if k else ''}; captured sizes {graphs.sizes} in "
          f"{time.perf_counter() - began:.1f} s")
    print("| sequences | eager ms | graph ms | eager / graph |")
    print("| --- | --- | --- | --- |")
    with torch.inference_mode():
        for b in args.batch:
            eager, replay, size = step_functions(model, mtp, graphs, layers, b, k, args.context, per_seq, page)
            times = median_times({"eager": eager, "graph": replay}, args.repeats)  # taking turns
            eager_ms, graph_ms = times["eager"] * 1e3, times["graph"] * 1e3
            print(f"| {b} (graph {size} rows) | {eager_ms:.2f} | {graph_ms:.2f} | {eager_ms / graph_ms:.2f}x |")


if __name__ == "__main__":
    main()
