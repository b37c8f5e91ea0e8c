"""A decode step's forward, eager against replayed from its CUDA graph (engine/decode_graphs.py),
in one process on one GPU: the model of the checkpoint with its FP8 weights, every sequence with
--context cached tokens. Each side includes building its inputs from the step's sequences, as the
worker does. Needs a GPU.

    .venv/bin/python benchmarks/decode_graphs.py [--checkpoint DIR] [--batch 1 8 64 256] [--context 1024]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="checkpoints/small-seed0")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("decode_graphs: needs a GPU (CUDA graphs); none is visible")
        return
    from model.checkpoint_maker import ensure_checkpoint

    ckpt = ensure_checkpoint(args.checkpoint)
    cfg = ModelConfig.from_checkpoint(ckpt)
    weights = load_weights(ckpt, cfg, torch.bfloat16, include_mtp=False, keep_fp8=True)
    model = DeepseekV3(cfg, weights, max_positions=args.context + 64).to("cuda")
    page = args.block_size
    per_seq = -(-(args.context + 1) // page)
    most = max(args.batch)
    cache = LatentCache(cfg.num_cache_layers, most * per_seq + 1, page, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                        torch.bfloat16, "cuda")
    layers = [cache.layer(i) for i in range(cfg.num_cache_layers)]
    began = time.perf_counter()
    graphs = DecodeGraphs(model, layers, page, most, args.context + 1, most * per_seq,
                          lambda: CudaGraphReplay(torch.cuda.graph_pool_handle()))
    print(f"{torch.cuda.get_device_name()}, {cfg.num_hidden_layers} layers, context {args.context}; "
          f"captured sizes {graphs.sizes} in {time.perf_counter() - began:.1f} s")
    print("| sequences | eager ms | graph ms | eager / graph |")
    print("| --- | --- | --- | --- |")
    with torch.inference_mode():
        for b in args.batch:
            chunks = [SequenceChunk([7], args.context, list(range(i * per_seq, (i + 1) * per_seq))) for i in range(b)]
            size = graphs.size_for(chunks)

            def eager(chunks=chunks):
                model(ForwardBatch.build(chunks, page, "cuda"), layers)
                torch.cuda.synchronize()

            def replay(chunks=chunks, size=size):
                graphs.run(chunks, size)
                torch.cuda.synchronize()

            times = median_times({"eager": eager, "graph": replay}, args.repeats)  # taking turns
            eager_ms, graph_ms = times["eager"] * 1e3, times["graph"] * 1e3
            print(f"| {b} (graph {size}) | {eager_ms:.2f} | {graph_ms:.2f} | {eager_ms / graph_ms:.2f}x |")


if __name__ == "__main__":
    main()
