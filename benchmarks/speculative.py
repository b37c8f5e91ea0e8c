"""MTP speculative decoding against no speculation, at batch 1, 32 and 256, on the embedded demo
model (held-out task prompts, greedy, asynchronous scheduling on as by default): the adaptive
draft-length policy (the default) and fixed draft lengths, each draft position's acceptance, the
draft lengths the policy chose, and whether the outputs are the same.

The peer is the same engine without speculation on the same prompts, measured in the same run:
the configurations take turns within each round (each round starts every one afresh, in a
rotated order, and warms it up on every batch size), and the table gives medians over rounds:
tok/s, and each ratio as the median of the per-round ratios to the peer.
Batch 1: decode tokens/s = output tokens after the first / time from first token to finish,
summed over requests run one at a time. Batch B: output tokens / wall time, over 256 / B
batches of B run one after another.

    .venv/bin/python benchmarks/speculative.py [--k 2] [--fixed 1 2 3] [--rounds 3] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not benchmarks/

from engine import LLM, SamplingParams
from entrypoints.demo import demo_prompts
from model.demo_checkpoint import default_model_dir


def _lengths(after, before) -> list[int]:
    """The draft lengths the engine chose between two stats() (how many sampling steps each)."""
    earlier = before.spec_draft_lengths or [0] * len(after.spec_draft_lengths)
    return [a - b for a, b in zip(after.spec_draft_lengths, earlier)]


def measure(model_dir: Path, k: int, policy: str, prompts: list[str], args) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    with LLM(model_dir, dtype=args.dtype, num_speculative_tokens=k, speculative_draft_policy=policy,
             device=args.device, max_num_seqs=max(args.batches)) as llm:
        # Warm-up: a step of a shape the process has not run yet pays first-time costs (the
        # first batch of 32 with drafts ran 8x slower than the next); a server pays them once.
        for b in sorted(args.batches, reverse=True) * 2 + [1] * 8:
            llm.generate(prompts[-b:], params, use_tqdm=False)
        before = llm.stats()
        tokens = seconds = 0.0
        for p in prompts[: args.batch1_prompts]:
            o = llm.generate(p, params, use_tqdm=False)[0]
            tokens += len(o.token_ids) - 1
            seconds += o.metrics.finish_time - o.metrics.first_token_time
        out = {"batch1": tokens / seconds}
        outputs = []
        lengths = {"batch1": _lengths(llm.stats(), before)}
        for b in args.batches:
            # Batches of one size, back to back, until about 256 requests have run: a batch of 32
            # alone is a tenth of a second of work, too short to time on a shared host.
            start_stats = llm.stats()
            tokens, start = 0, time.perf_counter()
            for rep in range(max(1, 256 // b)):
                outs = llm.generate(prompts[rep * b % len(prompts):][:b], params, use_tqdm=False)
                tokens += sum(len(o.token_ids) for o in outs)
                outputs.append([o.token_ids for o in outs])
            out[f"batch{b}"] = tokens / (time.perf_counter() - start)
            lengths[f"batch{b}"] = _lengths(llm.stats(), start_stats)
        after = llm.stats()
        out["lengths_by_batch"] = lengths
    drafts = after.spec_num_drafts - before.spec_num_drafts
    out["acceptance"] = [(a - b) / drafts if drafts else 0.0
                         for a, b in zip(after.spec_accepted_per_pos, before.spec_accepted_per_pos or [0] * k)]
    out["draft_lengths"] = [a - b for a, b in zip(after.spec_draft_lengths, before.spec_draft_lengths or [0] * (k + 1))]
    out["outputs"] = outputs
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--k", type=int, default=2, help="the adaptive policy's bound (num_speculative_tokens)")
    ap.add_argument("--fixed", type=int, nargs="*", default=[1, 2, 3], help="fixed draft lengths to run too")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch1-prompts", type=int, default=24)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args()
    model_dir = Path(args.model) if args.model else default_model_dir()
    prompts = [p.prompt for p in demo_prompts(model_dir, max(args.batch1_prompts, *args.batches) + 8)]
    configs = [("off", 0, "fixed"), (f"adaptive k<={args.k}", args.k, "adaptive")]
    configs += [(f"fixed k={k}", k, "fixed") for k in args.fixed]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for name, k, policy in order:
            runs[name].append(measure(model_dir, k, policy, prompts, args))
            print(f"round {r + 1}: {name}: " + ", ".join(f"{key} {runs[name][-1][key]:.0f}"
                                                         for key in ["batch1"] + [f"batch{b}" for b in args.batches]),
                  file=sys.stderr, flush=True)
    keys = ["batch1"] + [f"batch{b}" for b in args.batches]
    median = {name: {key: statistics.median(run[key] for run in rs) for key in keys} for name, rs in runs.items()}
    # Each round's ratio to the peer's run of the same round, then their median.
    ratio = {name: {key: statistics.median(run[key] / peer[key] for run, peer in zip(rs, runs["off"]))
                    for key in keys} for name, rs in runs.items()}
    print(f"model {model_dir}, {args.dtype}, greedy, max_tokens {args.max_tokens}, asynchronous scheduling; "
          f"medians of {args.rounds} rounds; peer: the same engine without speculation")
    head = f"{'':18} {'acceptance per position':>24} {'batch-1 decode tok/s':>21} {'x':>5}"
    for b in args.batches:
        head += f" {'batch-' + str(b) + ' tok/s':>15} {'x':>5}"
    print(head + f" {'same output':>11}  draft lengths chosen (0..k)")
    table = {}
    for name, _, _ in configs:
        m, last = median[name], runs[name][-1]
        acc = "[" + ", ".join(f"{a:.2f}" for a in last["acceptance"]) + "]" if last["acceptance"] else "-"
        row = f"{name:18} {acc:>24} {m['batch1']:>21.1f} {ratio[name]['batch1']:>5.2f}"
        for b in args.batches:
            key = f"batch{b}"
            row += f" {m[key]:>15.1f} {ratio[name][key]:>5.2f}"
        same = all(run["outputs"] == runs["off"][0]["outputs"] for run in runs[name])
        lengths = " ".join(str(n) for n in last["draft_lengths"]) or "-"
        print(row + f" {str(same):>11}  {lengths}")
        if last["lengths_by_batch"].get("batch1"):
            print(f"{'':18} draft lengths chosen by batch (last round): " + "; ".join(
                f"{key}: {' '.join(map(str, v))}" for key, v in last["lengths_by_batch"].items()))
        table[name] = {"median": m, "ratio": ratio[name], "same_output": same,
                       "acceptance": last["acceptance"], "draft_lengths": last["draft_lengths"]}
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
