"""A burst of requests behind one long cached prefix (a shared system prompt): one prefill step of
N chunks, each a few new tokens after the same P cached ones, through the model on the CPU.

Each chunk attends over its whole context through the expanded path (kernels/mla_attention.py),
which turns the context's latents into per-head keys and values. Before session 17 the step
expanded the prefix N times, all at once. The engine now groups chunks under max_model_len +
max_num_batched_tokens context tokens, and a group whose contexts share rows expands each once.
Cases, alternated in the same run: the engine as it is; grouped but every context expanded
(the batch without its host block tables, which the sharing needs); and the peer, one group with
every context expanded (the code before). Printed: each one's memory peak (engine/memory_profile.py's
meter: resident memory on the host) and median time, and what the one-group expansion would
hold for DeepSeek-V3 (128 heads, nope 128 + v 128 + rope 64, bf16).

    .venv/bin/python benchmarks/shared_prefix.py --prefix 4000 --suffix 24 --requests 64
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # this folder's kernels.py would shadow the package

import torch

from engine.memory_profile import PeakMeter
from engine.model_config import ModelConfig
from kernels.forward_batch import ForwardBatch, SequenceChunk
from model.checkpoint_maker import ensure_checkpoint
from model.deepseek_v3 import DeepseekV3
from model.loader import load_weights

BLOCK = 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", type=int, default=4000)
    ap.add_argument("--suffix", type=int, default=24)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    if args.requests * args.suffix > args.max_num_batched_tokens:
        raise SystemExit("requests x suffix must fit the step's token budget")
    ckpt = ensure_checkpoint("checkpoints/small-seed0", "small", 0)
    cfg = ModelConfig.from_checkpoint(ckpt)
    limit = cfg.max_position_embeddings + args.max_num_batched_tokens  # the engine's, at the default max_model_len
    model = DeepseekV3(cfg, load_weights(ckpt, cfg, torch.bfloat16))
    prefix_blocks = -(-args.prefix // BLOCK)
    own = -(-(args.prefix + args.suffix) // BLOCK) - args.prefix // BLOCK
    num_blocks = prefix_blocks + args.requests * own
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(cfg.num_cache_layers, num_blocks, BLOCK, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                        generator=gen).to(torch.bfloat16)
    layers = [cache[i] for i in range(cfg.num_cache_layers)]
    shared = list(range(args.prefix // BLOCK))  # full prefix blocks; a partial last one is each request's own
    chunks = []
    for r in range(args.requests):
        table = shared + [prefix_blocks + r * own + j for j in range(own)]
        tokens = torch.randint(cfg.vocab_size, (args.suffix,), generator=gen).tolist()
        chunks.append(SequenceChunk(tokens, args.prefix, table))
    batch = ForwardBatch.build(chunks, BLOCK)
    unshared = dataclasses.replace(batch, host_block_tables=None)

    def run(step, expand_limit):
        model.prefill_expand_limit = expand_limit
        with torch.inference_mode():
            model(step, layers)

    cases = {"engine": (batch, limit), "grouped": (unshared, limit), "one group": (unshared, None)}
    peaks = {name: [] for name in cases}
    times = {name: [] for name in cases}
    run(batch, limit)  # warm-up
    for _ in range(args.reps):
        for name, case in cases.items():
            meter = PeakMeter("cpu")
            meter.start()
            t = time.perf_counter()
            run(*case)
            times[name].append(time.perf_counter() - t)
            peaks[name].append(meter.peak())
    context = args.requests * (args.prefix + args.suffix)
    print(f"small checkpoint, bf16, {torch.get_num_threads()} threads: {args.requests} chunks of {args.suffix} "
          f"tokens after {args.prefix} cached ones ({context} context tokens in all; groups of <= {limit})")
    for name in cases:
        peak, median = max(peaks[name]) / 2**20, statistics.median(times[name]) * 1e3
        print(f"  {name:10s}: peak {peak:8.1f} MiB, median {median:8.1f} ms")
    for name in ("engine", "grouped"):
        mem_ratio = max(peaks["one group"]) / max(max(peaks[name]), 1)
        time_ratio = statistics.median(times["one group"]) / statistics.median(times[name])
        print(f"  one group (before) / {name}: memory {mem_ratio:.2f}x, time {time_ratio:.2f}x")
    per_token = 128 * (128 + 128 + 64) * 2  # DeepSeek-V3's expanded keys and values per context token, bf16
    bound = (163840 + args.max_num_batched_tokens) * per_token
    print(f"  DeepSeek-V3, the same burst in one group: {context * per_token / 2**30:.1f} GiB of keys and values; "
          f"grouped at max_model_len 163840: at most {bound / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
