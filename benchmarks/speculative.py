"""MTP speculative decoding against no speculation, at batch 1, 32 and 256, on the embedded demo
model (held-out task prompts, greedy, asynchronous scheduling on as by default): the adaptive
draft-length policy (the default) and fixed draft lengths, each draft position's acceptance, the
draft lengths the policy chose, and whether the outputs are the same.

The peer is the same engine without speculation on the same prompts, measured in the same run:
every configuration's engine is started and warmed up on every batch size first, then each
measurement (batch 1, then each batch size) goes round the configurations in turn, in an order
rotated every round, and the table gives medians over rounds: tok/s, and each ratio as the median
of the per-round ratios to the peer.
Batch 1: decode tokens/s = output tokens after the first / time from first token to finish,
summed over requests run one at a time. Batch B: output tokens / wall time, over 256 / B
batches of B run one after another.

    .venv/bin/python benchmarks/speculative.py [--k 2] [--fixed 1 2 3] [--rounds 3] [--model DIR]
"""

from __future__ import annotations

import argparse
import contextlib
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


def start(stack: contextlib.ExitStack, model_dir: Path, k: int, policy: str, asynchronous: bool, prompts: list[str],
          args) -> LLM:
    llm = stack.enter_context(LLM(model_dir, dtype=args.dtype, num_speculative_tokens=k,
                                  speculative_draft_policy=policy, device=args.device,
                                  max_num_seqs=max(args.batches), async_scheduling=asynchronous))
    # Warm-up: a step of a shape the process has not run yet pays first-time costs (the first
    # batch of 32 with drafts ran 8x slower than the next); a server pays them once.
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for b in sorted(args.batches, reverse=True) * 2 + [1] * 8:
        llm.generate(prompts[-b:], params, use_tqdm=False)
    return llm


def measure(llm: LLM, key: str, prompts: list[str], args) -> tuple[float, list, list[int]]:
    """(tok/s, the outputs, the draft lengths chosen) of one measurement: `batch1` or `batch<B>`."""
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    before = llm.stats()
    outputs = []
    if key == "batch1":
        tokens = seconds = 0.0
        for p in prompts[: args.batch1_prompts]:
            o = llm.generate(p, params, use_tqdm=False)[0]
            tokens += len(o.token_ids) - 1
            seconds += o.metrics.finish_time - o.metrics.first_token_time
            outputs.append(o.token_ids)
        return tokens / seconds, outputs, _lengths(llm.stats(), before)
    b = int(key[len("batch"):])
    # Batches of one size, back to back, until about 256 requests have run: a batch of 32 alone
    # is a tenth of a second of work, too short to time on a shared host.
    tokens, started = 0, time.perf_counter()
    for rep in range(max(1, 256 // b)):
        outs = llm.generate(prompts[rep * b % len(prompts):][:b], params, use_tqdm=False)
        tokens += sum(len(o.token_ids) for o in outs)
        outputs.append([o.token_ids for o in outs])
    return tokens / (time.perf_counter() - started), outputs, _lengths(llm.stats(), before)


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
    ap.add_argument("--synchronous", action="store_true",
                    help="also run every configuration planning each step after the last returns")
    args = ap.parse_args()
    model_dir = Path(args.model) if args.model else default_model_dir()
    prompts = [p.prompt for p in demo_prompts(model_dir, max(args.batch1_prompts, *args.batches) + 8)]
    configs = [("off", 0, "fixed", True), (f"adaptive k<={args.k}", args.k, "adaptive", True)]
    configs += [(f"fixed k={k}", k, "fixed", True) for k in args.fixed]
    if args.synchronous:
        configs += [(name + ", sync", k, policy, False) for name, k, policy, _ in configs]
    keys = ["batch1"] + [f"batch{b}" for b in args.batches]
    runs: dict[str, list[dict]] = {name: [{} for _ in range(args.rounds)] for name, *_ in configs}
    outputs: dict[str, list] = {name: [] for name, *_ in configs}
    by_batch: dict[str, dict[str, list[int]]] = {name: {} for name, *_ in configs}
    with contextlib.ExitStack() as stack:
        # Every configuration's engine is up at once (idle ones take no CPU), and each measurement
        # goes round all of them in turn: the ratios compare runs minutes, not hours, apart.
        engines = {name: start(stack, model_dir, k, policy, asynchronous, prompts, args)
                   for name, k, policy, asynchronous in configs}
        firsts = {name: llm.stats() for name, llm in engines.items()}
        for r in range(args.rounds):
            for key in keys:
                order = configs[r % len(configs):] + configs[: r % len(configs)]
                for name, *_ in order:
                    tps, outs, chosen = measure(engines[name], key, prompts, args)
                    runs[name][r][key] = tps
                    outputs[name].append((r, key, outs))
                    by_batch[name][key] = [a + b for a, b in zip(by_batch[name].get(key, [0] * len(chosen)), chosen)]
            print(f"round {r + 1}: " + "; ".join(f"{name} " + ", ".join(f"{runs[name][r][key]:.0f}" for key in keys)
                                                 for name, *_ in configs), file=sys.stderr, flush=True)
        lasts = {name: llm.stats() for name, llm in engines.items()}
    for name, *_ in configs:  # what every round's measurements drafted and accepted, warm-up excluded
        before, after = firsts[name], lasts[name]
        drafts = after.spec_num_drafts - before.spec_num_drafts
        k = len(after.spec_accepted_per_pos)
        for run in runs[name]:
            run["acceptance"] = [(a - b) / drafts if drafts else 0.0 for a, b in
                                 zip(after.spec_accepted_per_pos, before.spec_accepted_per_pos or [0] * k)]
            run["draft_lengths"] = _lengths(after, before)
            run["lengths_by_batch"] = by_batch[name]
    median = {name: {key: statistics.median(run[key] for run in rs) for key in keys} for name, rs in runs.items()}
    # Each round's ratio to the peer's run of the same round, then their median.
    ratio = {name: {key: statistics.median(run[key] / peer[key] for run, peer in zip(rs, runs["off"]))
                    for key in keys} for name, rs in runs.items()}
    print(f"model {model_dir}, {args.dtype}, greedy, max_tokens {args.max_tokens}, asynchronous scheduling "
          f"(', sync': planned after the last step returns); medians of {args.rounds} rounds; peer: the same "
          "engine without speculation")
    head = f"{'':24} {'acceptance per position':>24} {'batch-1 decode tok/s':>21} {'x':>5}"
    for b in args.batches:
        head += f" {'batch-' + str(b) + ' tok/s':>15} {'x':>5}"
    print(head + f" {'same output':>11}  draft lengths chosen (0..k)")
    table = {}
    for name, *_ in configs:
        m, last = median[name], runs[name][-1]
        acc = "[" + ", ".join(f"{a:.2f}" for a in last["acceptance"]) + "]" if last["acceptance"] else "-"
        row = f"{name:24} {acc:>24} {m['batch1']:>21.1f} {ratio[name]['batch1']:>5.2f}"
        for b in args.batches:
            key = f"batch{b}"
            row += f" {m[key]:>15.1f} {ratio[name][key]:>5.2f}"
        same = [outs for _, _, outs in outputs[name]] == [outs for _, _, outs in outputs["off"]]
        lengths = " ".join(str(n) for n in last["draft_lengths"]) or "-"
        print(row + f" {str(same):>11}  {lengths}")
        if last["lengths_by_batch"].get("batch1"):
            print(f"{'':24} draft lengths chosen by batch (all rounds): " + "; ".join(
                f"{key}: {' '.join(map(str, v))}" for key, v in last["lengths_by_batch"].items()))
        table[name] = {"median": m, "ratio": ratio[name], "same_output": same,
                       "acceptance": last["acceptance"], "draft_lengths": last["draft_lengths"]}
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
