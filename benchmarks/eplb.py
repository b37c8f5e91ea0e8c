"""EPLB against the static expert ranges on a checkpoint whose routers prefer some experts
(make_checkpoint's router_skew), expert-parallel over N gloo worker processes on this CPU.

Both configurations serve the same batches of random prompts (greedy, fixed lengths) in the same
run, taking turns (A B A B ...; each turn starts an engine afresh). In each turn a first batch
lets EPLB settle (its placement follows the window's load after the first interval), then a
second batch is measured:
- the imbalance: per MoE layer the most loaded rank's routed choices over the mean rank's,
  averaged over layers, over the window (the /metrics gauge `mlaserve:moe_imbalance`; with EPLB
  counted on the physical slots, so replicas' shares are measured, not assumed);
- the step time: the measured batch's wall time over its steps (every rank runs every step);
- the re-placements: how many in the turn, slots moved, and the longest switch (moving the experts
  between two steps, timed on the slowest rank) against the median step time. A step that
  switches takes its usual time plus the switch.
The outputs of the two configurations are compared token for token (float32: in bf16 the experts'
sums round differently with the rows beside them, and replicas change those rows).

    .venv/bin/python benchmarks/eplb.py [--ep 4] [--redundant 4] [--skew 0.3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not benchmarks/

import torch

from engine import LLM, SamplingParams
from model.checkpoint_maker import make_checkpoint


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 250, (length,), generator=g).tolist() for _ in range(n)]


def turn(checkpoint: Path, options: dict, args) -> dict:
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    with LLM(checkpoint, dtype="float32", block_size=16, kv_cache_memory=64 << 20, ep_size=args.ep,
             max_num_seqs=args.requests, **options) as llm:
        llm.generate(_prompts(args.requests, args.prompt_len, 1), params, use_tqdm=False)  # EPLB settles
        before = llm.stats()
        started = time.perf_counter()
        outs = llm.generate(_prompts(args.requests, args.prompt_len, 2), params, use_tqdm=False)
        seconds = time.perf_counter() - started
        after = llm.stats()
    steps = after.num_steps - before.num_steps
    return {"imbalance": after.moe_imbalance, "rank_load": after.moe_window_rank_load,
            "step_ms": 1e3 * seconds / steps, "steps": steps,
            "tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / seconds,
            "rebalances": after.eplb_rebalances, "moved_slots": after.eplb_moved_slots,
            "max_switch_ms": 1e3 * after.eplb_max_seconds,
            "tokens": [o.outputs[0].token_ids for o in outs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--skew", type=float, default=0.3, help="router_skew of the checkpoint")
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--redundant", type=int, default=4)
    ap.add_argument("--interval", type=int, default=32, help="eplb_interval_steps")
    ap.add_argument("--window", type=int, default=64, help="eplb_window_steps")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args()
    configs = {"static": {}, "eplb": dict(enable_eplb=True, num_redundant_experts=args.redundant,
                                          eplb_interval_steps=args.interval, eplb_window_steps=args.window)}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(args.preset, seed=0, out_dir=tmp, router_skew=args.skew)
        for r in range(args.rounds):
            for name in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
                runs[name].append(turn(checkpoint, configs[name], args))
                last = runs[name][-1]
                print(f"round {r} {name:6s} imbalance {last['imbalance']:.3f}  step {last['step_ms']:.1f} ms  "
                      f"rebalances {last['rebalances']}  longest switch {last['max_switch_ms']:.1f} ms", flush=True)
    table = {name: {key: statistics.median(run[key] for run in rs)
                    for key in ("imbalance", "step_ms", "tok_s", "rebalances", "moved_slots", "max_switch_ms")}
             for name, rs in runs.items()}
    same = all(a["tokens"] == b["tokens"] for a, b in zip(runs["static"], runs["eplb"]))
    s, e = table["static"], table["eplb"]
    print(f"\n{args.preset}, router_skew {args.skew}, EP {args.ep} (gloo), {args.redundant} redundant slots, "
          f"interval {args.interval} / window {args.window} steps, {args.requests} requests x "
          f"{args.max_tokens} tokens, medians of {args.rounds} rounds")
    print("| | imbalance (max/mean rank load) | decode step | output tok/s |")
    print("| --- | --- | --- | --- |")
    print(f"| static ranges | {s['imbalance']:.3f} | {s['step_ms']:.1f} ms | {s['tok_s']:.0f} |")
    print(f"| EPLB | {e['imbalance']:.3f} | {e['step_ms']:.1f} ms ({e['step_ms'] / s['step_ms']:.2f}x) | "
          f"{e['tok_s']:.0f} ({e['tok_s'] / s['tok_s']:.2f}x) |")
    print(f"EPLB: {e['rebalances']:.0f} re-placements a turn, {e['moved_slots']:.0f} slots moved; the longest "
          f"switch {e['max_switch_ms']:.1f} ms = {e['max_switch_ms'] / e['step_ms']:.2f}x the median step "
          f"(that step: {(e['max_switch_ms'] + e['step_ms']) / e['step_ms']:.2f}x)")
    print(f"outputs identical: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "table": table, "identical": same,
                                               "runs": {n: [{k: v for k, v in run.items() if k != "tokens"}
                                                            for run in rs] for n, rs in runs.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
