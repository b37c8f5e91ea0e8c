"""Batch-1 greedy decode with asynchronous scheduling against the same engine planning each step
after the last returns (the peer, measured in the same run, runs alternated). Short steps are
where the overlap shows: the demo model by default.

    .venv/bin/python benchmarks/async_scheduling.py [--model DIR] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# This folder holds kernels.py, which would shadow the kernels package: the repo root goes first.
sys.path[0] = str(Path(__file__).resolve().parents[1])


def decode_rate(model: str, async_scheduling: bool, prompts: list[list[int]], max_tokens: int) -> float:
    from engine import LLM, SamplingParams

    with LLM(model, async_scheduling=async_scheduling) as llm:
        llm.generate([prompts[0]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        tokens = sum(len(llm.generate([p], params, use_tqdm=False)[0].token_ids) for p in prompts)
        return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="checkpoint directory (default: the demo model)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.model is None:
        from model.demo_checkpoint import default_model_dir

        args.model = str(default_model_dir())
    prompts = [[5 + i % 7, 9, 11, 3] for i in range(args.prompts)]
    for _ in range(args.rounds):
        on = decode_rate(args.model, True, prompts, args.max_tokens)
        off = decode_rate(args.model, False, prompts, args.max_tokens)
        print(f"batch-1 decode: {on:.0f} tok/s asynchronous, {off:.0f} tok/s step after step ({on / off:.2f}x)")


if __name__ == "__main__":
    main()
