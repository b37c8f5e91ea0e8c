"""Multi-turn chat behind a long shared system prompt, with the prefix cache's host and disk tiers
against the same workload without them, alternated in one run (`small` checkpoint, bf16).

Conversations go in groups of --concurrency: every group sends its conversations' turn t, then the
next group does, so between two turns of one conversation all the others have had theirs and the
pool (--pool-blocks) cannot have kept them. Each turn's prompt is the conversation so far: the
system prompt, every earlier user message and answer, and a new user message.

Printed per case: TTFT p50 / p99 of the first turns and of the returning ones, output tok/s over
all turns, the share of returning turns' prompt tokens found in each tier, and the bytes per token
a block file holds on disk against 576 x cached layers x 2 (bf16) that the design predicts.

    .venv/bin/python benchmarks/multi_turn.py --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # this folder's kernels.py would shadow the package

import torch

from engine import LLM, SamplingParams
from engine.model_config import ModelConfig
from model.checkpoint_maker import ensure_checkpoint

BLOCK = 64


def conversations(args, vocab: int):
    g = torch.Generator().manual_seed(0)
    system = torch.randint(2, vocab, (args.system_tokens,), generator=g).tolist()
    users = [[torch.randint(2, vocab, (args.user_tokens,), generator=g).tolist() for _ in range(args.turns)]
             for _ in range(args.conversations)]
    return system, users


def run(ckpt: str, args, system, users, tiers: dict) -> dict:
    cfg = ModelConfig.from_checkpoint(ckpt)
    bytes_per_token = cfg.num_cache_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    block_bytes = bytes_per_token * BLOCK
    params = SamplingParams(temperature=0, max_tokens=args.output_tokens, ignore_eos=True)
    histories = [list(system) for _ in users]
    first, returning, outputs = [], [], []
    with LLM(ckpt, block_size=BLOCK, kv_cache_memory=args.pool_blocks * block_bytes, max_num_seqs=args.concurrency,
             **({"kv_offload_memory": args.host_blocks * block_bytes} | tiers) if tiers else {}) as llm:
        llm.generate([[5] * 8], params, use_tqdm=False)  # warm-up
        before = llm.stats()
        start = time.perf_counter()
        for turn in range(args.turns):
            for g0 in range(0, len(users), args.concurrency):
                group = range(g0, min(g0 + args.concurrency, len(users)))
                prompts = [histories[c] + users[c][turn] for c in group]
                outs = llm.generate(prompts, params, use_tqdm=False)
                for c, p, o in zip(group, prompts, outs):
                    (returning if turn else first).append(o.metrics.time_to_first_token)
                    outputs.append(len(o.token_ids))
                    histories[c] = p + o.token_ids
        wall = time.perf_counter() - start
        after = llm.stats()
    out = {"first": first, "returning": returning, "tok_s": sum(outputs) / wall, "outputs": outputs,
           "computed": after.computed_prompt_tokens - before.computed_prompt_tokens,
           "hits": after.prefix_cache_hits - before.prefix_cache_hits,
           "prompt_tokens": after.prompt_tokens - before.prompt_tokens, "tiers": after.kv_tiers,
           "design_bytes_per_token": bytes_per_token,
           "preemptions": after.num_preemptions - before.num_preemptions,
           "load_wait": after.metrics.histograms["kv_tier_load_seconds"]}
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--system-tokens", type=int, default=2048)
    ap.add_argument("--user-tokens", type=int, default=192)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--pool-blocks", type=int, default=128, help="the pool: holds a group, not every conversation")
    ap.add_argument("--host-blocks", type=int, default=192, help="host tier: part of what the pool lets go")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    ckpt = str(ensure_checkpoint("checkpoints/small-seed0", "small", 0))
    system, users = conversations(args, ModelConfig.from_checkpoint(ckpt).vocab_size)
    results: dict[str, list[dict]] = {"no tiers": [], "host + disk": []}
    for _ in range(args.rounds):
        results["no tiers"].append(run(ckpt, args, system, users, {}))
        with tempfile.TemporaryDirectory() as disk:
            r = run(ckpt, args, system, users, {"kv_disk_cache_dir": disk})
            files = list(Path(disk).rglob("*.kvb"))
            r["file_bytes"] = sum(f.stat().st_size for f in files) / max(len(files), 1)
            results["host + disk"].append(r)
    print(f"small checkpoint, bf16, {torch.get_num_threads()} threads: {args.conversations} conversations x "
          f"{args.turns} turns, {args.concurrency} at a time, system prompt {args.system_tokens} tokens, user "
          f"{args.user_tokens}, answers {args.output_tokens}; pool {args.pool_blocks} blocks of {BLOCK}, host tier "
          f"{args.host_blocks} blocks, {args.rounds} rounds alternated")
    summary = {}
    for name, runs in results.items():
        first = [t for r in runs for t in r["first"]]
        back = [t for r in runs for t in r["returning"]]
        tok_s = statistics.median(r["tok_s"] for r in runs)
        summary[name] = (statistics.median(back), tok_s)
        print(f"  {name:12s}: first turns TTFT p50 {statistics.median(first) * 1e3:7.1f} ms p99 "
              f"{pct(first, 0.99) * 1e3:7.1f} ms | returning turns TTFT p50 {statistics.median(back) * 1e3:7.1f} ms "
              f"p99 {pct(back, 0.99) * 1e3:7.1f} ms | output {tok_s:6.1f} tok/s | prompt tokens computed "
              f"{runs[-1]['computed']}, preemptions {runs[-1]['preemptions']}")
    assert [r["outputs"] for r in results["no tiers"]] == [r["outputs"] for r in results["host + disk"]]
    base, tiered = summary["no tiers"], summary["host + disk"]
    print(f"  returning turns' TTFT p50: no tiers / tiers = {base[0] / tiered[0]:.2f}x (goal >= 3x); "
          f"output tok/s: tiers / no tiers = {tiered[1] / base[1]:.2f}x")
    r = results["host + disk"][-1]
    t, total = r["tiers"], r["prompt_tokens"]
    pool = r["hits"] - t.host_hit_tokens - t.disk_hit_tokens
    print(f"  prompt tokens of all turns ({total}) found in the pool {pool / total:.1%}, host "
          f"{t.host_hit_tokens / total:.1%}, disk {t.disk_hit_tokens / total:.1%}, computed "
          f"{r['computed'] / total:.1%} (no tiers: pool {results['no tiers'][-1]['hits'] / total:.1%}); "
          f"failed reads {t.reads_failed}")
    print(f"  copied: pool->host {t.bytes_pool_to_host / 2**20:.1f} MiB, host->pool {t.bytes_host_to_pool / 2**20:.1f} "
          f"MiB, host->disk {t.bytes_host_to_disk / 2**20:.1f} MiB, disk->host {t.bytes_disk_to_host / 2**20:.1f} "
          f"MiB; worker time copying pool<->host {t.copy_seconds * 1e3:.1f} ms")
    design = r["design_bytes_per_token"]
    print(f"  disk: {r['file_bytes'] / BLOCK:.1f} bytes per token in a block file (header and token ids "
          f"included) against {design} = 576 x cached layers x 2 predicted ({r['file_bytes'] / BLOCK / design:.4f}x)")


if __name__ == "__main__":
    main()
