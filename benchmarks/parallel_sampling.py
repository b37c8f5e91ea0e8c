"""Parallel sampling (SamplingParams.n): n completions of each prompt, the prompt computed once.

P prompts of L tokens, each sampled N times for T tokens (temperature 1, seeded, ignore_eos), on
the same checkpoint and threads:
  mlaserve, n=N      one request per prompt with n = N
  mlaserve, copies   N requests per prompt with n = 1 and seeds seed + i: what a client without
                     `n` sends; it draws the same tokens (up to bf16 rounding: the share of
                     identical completions is printed), and shares the prompt only where the
                     prefix cache happens to catch it
  transformers       generate(num_return_sequences=N, do_sample=True), --hf-batch-size prompts a batch
Each mlaserve run has an engine of its own (no cache carried over). Prints output tokens/s, the
prompt tokens each mlaserve run computed, and the ratios.

    .venv/bin/python benchmarks/parallel_sampling.py
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

# This folder holds kernels.py, which would shadow the kernels package: the repo root goes first.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch


def run_mlaserve(ckpt: Path, prompts: list[list[int]], args, grouped: bool) -> tuple[float, int, list[list[int]]]:
    """Seconds, prompt tokens computed, and the completions (prompt-major, index-minor)."""
    from engine import LLM, SamplingParams

    n, common = args.n, dict(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    with LLM(ckpt, dtype="bfloat16", max_num_batched_tokens=args.max_num_batched_tokens,
             max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory) as llm:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        before = llm.stats().computed_prompt_tokens
        if grouped:
            batch = prompts
            params = [SamplingParams(n=n, seed=1000 * p, **common) for p in range(len(prompts))]
        else:
            batch = [prompt for prompt in prompts for _ in range(n)]
            params = [SamplingParams(seed=1000 * p + i, **common) for p in range(len(prompts)) for i in range(n)]
        start = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        computed = llm.stats().computed_prompt_tokens - before
    completions = [c.token_ids for o in outs for c in o.outputs]
    assert all(len(c) == args.output_len for c in completions)
    return elapsed, computed, completions


def run_transformers(ckpt: Path, prompts: list[list[int]], args) -> float:
    from model.hf_reference import load_hf_model

    model = load_hf_model(ckpt, torch.bfloat16)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), args.hf_batch_size):
            ids = torch.tensor(prompts[i : i + args.hf_batch_size])  # one length: no padding
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                           num_return_sequences=args.n, max_new_tokens=args.output_len,
                           min_new_tokens=args.output_len, pad_token_id=0, eos_token_id=None)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default="checkpoints/small-seed0")
    ap.add_argument("--hf-batch-size", type=int, default=4, help="prompts per transformers batch (x n rows)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--kv-cache-memory", type=int, default=2 << 30)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    from model.checkpoint_maker import ensure_checkpoint

    ckpt = ensure_checkpoint(args.checkpoint)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(2, 258) for _ in range(args.prompt_len)] for _ in range(args.num_prompts)]
    out_tokens = args.num_prompts * args.n * args.output_len
    t_group, c_group, group = run_mlaserve(ckpt, prompts, args, grouped=True)
    t_copies, c_copies, copies = run_mlaserve(ckpt, prompts, args, grouped=False)
    same = sum(a == b for a, b in zip(group, copies))
    # (bf16 results depend a little on how prefill was chunked, and a sampled token can flip)
    print(f"completions identical to the copies' draws: {same} of {len(group)}")
    print(f"{args.num_prompts} prompts of {args.prompt_len} tokens, n = {args.n}, {args.output_len} output tokens "
          f"each; threads: {torch.get_num_threads()}")
    print(f"mlaserve, n={args.n}:    {out_tokens / t_group:8.1f} output tok/s ({t_group:.2f} s), "
          f"prompt tokens computed {c_group}")
    print(f"mlaserve, copies: {out_tokens / t_copies:8.1f} output tok/s ({t_copies:.2f} s), "
          f"prompt tokens computed {c_copies}")
    print(f"n against copies: {t_copies / t_group:.2f}x the speed, {c_copies / c_group:.2f}x fewer prompt tokens")
    if not args.skip_transformers:
        t_hf = run_transformers(ckpt, prompts, args)
        print(f"transformers:     {out_tokens / t_hf:8.1f} output tok/s ({t_hf:.2f} s)")
        print(f"ratio (mlaserve n={args.n} / transformers num_return_sequences={args.n}): {t_hf / t_group:.2f}x")


if __name__ == "__main__":
    main()
