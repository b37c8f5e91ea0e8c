"""MTP speculative decoding: decode speed with and without it, at batch 1 and batch 32, on the
embedded demo model (held-out task prompts, greedy), and the acceptance of each draft position.

The peer is the same engine without speculation, measured in the same run on the same prompts.
Decode rate = output tokens after the first / time from first token to finish, per request
(batch 1), or output tokens / wall time of the whole batch (batch 32).

    .venv/bin/python benchmarks/speculative.py [--k 1 2 3] [--model DIR] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not benchmarks/

from engine import LLM, SamplingParams
from entrypoints.demo import demo_prompts
from model.demo_checkpoint import default_model_dir


def measure(model_dir: Path, k: int, prompts: list[str], batch1: int, batch: int, dtype: str, device: str) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=32)
    with LLM(model_dir, dtype=dtype, num_speculative_tokens=k, device=device) as llm:
        llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
        before = llm.stats()
        tokens = seconds = 0.0
        for p in prompts[:batch1]:
            o = llm.generate(p, params, use_tqdm=False)[0]
            tokens += len(o.token_ids) - 1
            seconds += o.metrics.finish_time - o.metrics.first_token_time
        start = time.perf_counter()
        outs = llm.generate(prompts[:batch], params, use_tqdm=False)
        wall = time.perf_counter() - start
        after = llm.stats()
    drafts = after.spec_num_drafts - before.spec_num_drafts
    per_pos = [(a - b) / drafts if drafts else 0.0
               for a, b in zip(after.spec_accepted_per_pos, before.spec_accepted_per_pos or [0] * k)]
    return {"k": k, "batch1_decode_tok_s": tokens / seconds, "batch_tok_s": sum(len(o.token_ids) for o in outs) / wall,
            "acceptance_per_pos": per_pos, "outputs": [o.token_ids for o in outs]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--batch1-prompts", type=int, default=24)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args()
    model_dir = Path(args.model) if args.model else default_model_dir()
    prompts = [p.prompt for p in demo_prompts(model_dir, max(args.batch1_prompts, args.batch) + 8)]
    base = measure(model_dir, 0, prompts, args.batch1_prompts, args.batch, args.dtype, args.device)
    rows = []
    print(f"model {model_dir}, {args.dtype}; peer: the same engine without speculation")
    print(f"{'k':>2} {'1st-draft acc':>13} {'per position':>20} {'batch-1 decode tok/s':>21} {'ratio':>6} "
          f"{'batch-' + str(args.batch) + ' tok/s':>14} {'ratio':>6} {'same output':>11}")
    print(f"{0:>2} {'-':>13} {'-':>20} {base['batch1_decode_tok_s']:>21.1f} {1.0:>6.2f} {base['batch_tok_s']:>14.1f} "
          f"{1.0:>6.2f} {'-':>11}")
    for k in args.k:
        r = measure(model_dir, k, prompts, args.batch1_prompts, args.batch, args.dtype, args.device)
        same = r["outputs"] == base["outputs"]
        pos = "[" + ", ".join(f"{a:.2f}" for a in r["acceptance_per_pos"]) + "]"
        print(f"{k:>2} {r['acceptance_per_pos'][0]:>13.2f} {pos:>20} {r['batch1_decode_tok_s']:>21.1f} "
              f"{r['batch1_decode_tok_s'] / base['batch1_decode_tok_s']:>6.2f} {r['batch_tok_s']:>14.1f} "
              f"{r['batch_tok_s'] / base['batch_tok_s']:>6.2f} {str(same):>11}")
        rows.append({k2: v for k2, v in r.items() if k2 != "outputs"})
    if args.json:
        base.pop("outputs")
        Path(args.json).write_text(json.dumps({"base": base, "spec": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
