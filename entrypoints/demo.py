"""`mlaserve demo`: the main job. Runs held-out chats (sorting digit lists, in DeepSeek's chat format; with its
tool too) through the engine on the embedded demo model and prints completions, accuracy, throughput, and what
MTP speculation buys.

The speculation figures come from the same engine settings run twice, once with
`num_speculative_tokens=k` and once without, on the same prompts: the first draft's acceptance
rate, and decode tokens/s (output tokens after the first, over the time from first token to
finish) at batch 1 and for the whole batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from model.chat_tokens import THINK_END
from model.demo_checkpoint import default_model_dir, training_meta
from model.demo_task import TOOL_NAME, Problem, held_out, is_correct, problems

HELD_OUT_SEED = 1_000_003
MAX_TOKENS = 96  # a tool call's completion is ~80 tokens


def demo_prompts(model_dir: Path, n: int, kinds: tuple[str, ...] = ("plain",)) -> list[Problem]:
    """n problems none of which the model was trained on (its training stream is regenerated
    from the seed and size recorded in the checkpoint)."""
    meta = training_meta(model_dir)
    seen: set[str] = set()
    if meta is not None:
        seen = {p.digits for p in problems(meta["seed"], meta["steps"] * meta["batch_size"])}
    return held_out(HELD_OUT_SEED, n, seen, kinds)


def reference_correct(model_dir: Path, probs: list[Problem]) -> list[bool]:
    """Per problem, whether transformers' greedy decoding answers it: greedy emits the completion
    and EOS exactly when every completion position is the argmax under teacher forcing, so one
    batched forward per kind of problem decides it."""
    import torch

    from model.demo_trainer import IGNORE, make_batch
    from model.hf_reference import load_hf_model

    hf = load_hf_model(model_dir, torch.float32)
    right: dict[int, bool] = {}
    for kind in dict.fromkeys(p.kind for p in probs):
        where = [i for i, p in enumerate(probs) if p.kind == kind]
        ids, labels = make_batch([probs[i] for i in where])
        with torch.inference_mode():
            logits = hf(ids).logits
        target = labels[:, 1:]
        right.update(zip(where, ((logits[:, :-1].argmax(-1) == target) | (target == IGNORE)).all(-1).tolist()))
    return [right[i] for i in range(len(probs))]


def _decode_rate(outs) -> float:
    """Output tokens after the first, per second of decoding, summed over requests' own timelines."""
    tokens = sum(len(o.token_ids) - 1 for o in outs if len(o.token_ids) > 1)
    seconds = sum(o.metrics.finish_time - o.metrics.first_token_time for o in outs if len(o.token_ids) > 1)
    return tokens / seconds if seconds > 0 else 0.0


def _run(model_dir: Path, probs: list[Problem], k: int, args, batch1: int, tool_probs: list[Problem] = ()):
    """Outputs, seconds, stats and batch-1 outputs of `probs`; the tool chats' outputs run after."""
    from engine import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    with LLM(model_dir, dtype=args.dtype, num_speculative_tokens=k, max_num_seqs=args.max_num_seqs,
             device=args.device, kv_cache_dtype=args.kv_cache_dtype) as llm:
        start = time.perf_counter()
        outs = llm.generate([p.prompt for p in probs], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        stats = llm.stats()
        single = [llm.generate(p.prompt, params, use_tqdm=False)[0] for p in probs[:batch1]]
        tools = llm.generate([p.prompt for p in tool_probs], params, use_tqdm=False) if tool_probs else []
    return outs, elapsed, stats, single, tools


def _print_tool_accuracy(probs: list[Problem], outs) -> None:
    print(f"\nwith the {TOOL_NAME} tool offered (held-out chats, greedy, with speculation):")
    for kind, what in (("call", "answered by a call of the tool"), ("answer", "answered from the tool's output")):
        right = [is_correct(p, o.text) for p, o in zip(probs, outs) if p.kind == kind]
        print(f"  {sum(right)}/{len(right)} {what}")


def _print_accuracy(model_dir: Path, probs, base, spec, show: int) -> None:
    """The completions shown, accuracy by length, against transformers, and with vs without speculation."""
    print(f"\n{len(probs)} held-out chats, greedy; first {show} (with speculation):")
    for p, o in list(zip(probs, spec))[: show]:
        mark = "ok " if is_correct(p, o.text) else "BAD"
        reasoning, _, content = o.text.rpartition(THINK_END)
        print(f"  {mark} user {p.question!r:24} reasoning {reasoning!r:20} content {content!r}")

    right = sum(is_correct(p, o.text) for p, o in zip(probs, spec))
    by_len: dict[int, list[bool]] = {}
    for p, o in zip(probs, spec):
        by_len.setdefault(p.digits.count(",") + 1, []).append(is_correct(p, o.text))
    lengths = ", ".join(f"{n} digits {sum(v)}/{len(v)}" for n, v in sorted(by_len.items()))
    same = sum(a.token_ids == b.token_ids for a, b in zip(base, spec))
    print(f"\naccuracy: {right}/{len(probs)} ({100 * right / len(probs):.1f}%): {lengths}")
    ref = reference_correct(model_dir, probs)
    agree = sum(r == is_correct(p, o.text) for r, p, o in zip(ref, probs, spec))
    print(f"transformers reference (fp32, same checkpoint, greedy): {sum(ref)}/{len(probs)} "
          f"({100 * sum(ref) / len(probs):.1f}%); right/wrong agrees with the engine on {agree}/{len(probs)}")
    print(f"greedy with speculation vs without: {same}/{len(probs)} outputs identical")


def _print_speed(probs, k: int, without, with_spec) -> None:
    base, base_s, base_single = without
    spec, spec_s, st, spec_single = with_spec
    first = st.spec_accepted_per_pos[0] / st.spec_num_drafts if st.spec_num_drafts else 0.0
    per_pos = ", ".join(f"{n / st.spec_num_drafts:.2f}" for n in st.spec_accepted_per_pos) if st.spec_num_drafts \
        else "-"
    mean_tokens = 1 + st.spec_accepted_tokens / st.spec_num_drafts if st.spec_num_drafts else 1.0
    print(f"MTP drafts (k={k}): first-draft acceptance {100 * first:.1f}%, per position [{per_pos}], "
          f"{mean_tokens:.2f} tokens per verification step")
    if st.spec_draft_lengths:
        chosen = ", ".join(f"{d}: {n}" for d, n in enumerate(st.spec_draft_lengths))
        print(f"draft lengths the policy chose for the batch of {len(probs)} (sampling steps by drafts "
              f"proposed): {chosen}")
    n_out = sum(len(o.token_ids) for o in spec)
    print(f"throughput (batch of {len(probs)}): {n_out / spec_s:.1f} output tokens/s with speculation, "
          f"{sum(len(o.token_ids) for o in base) / base_s:.1f} without "
          f"({base_s / spec_s:.2f}x); per request, decode {_decode_rate(spec):.1f} vs "
          f"{_decode_rate(base):.1f} tokens/s")
    b1_spec, b1_base = _decode_rate(spec_single), _decode_rate(base_single)
    print(f"batch 1 ({len(spec_single)} prompts one at a time): decode {b1_spec:.1f} tokens/s with speculation, "
          f"{b1_base:.1f} without ({b1_spec / b1_base if b1_base else 0:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mlaserve demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--num-speculative-tokens", type=int, default=2, choices=range(1, 4))
    ap.add_argument("--batch1-prompts", type=int, default=48, help="prompts run one at a time for batch-1 speed")
    ap.add_argument("--tool-prompts", type=int, default=64, help="chats with the tool offered, half of them after "
                    "its call (accuracy only)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--show", type=int, default=12, help="completions to print")
    args = ap.parse_args(argv)

    model_dir = Path(args.model) if args.model else default_model_dir()
    meta = training_meta(model_dir)
    trained = f"trained {meta['steps']} steps, seed {meta['seed']}" if meta else "not a demo checkpoint"
    print(f"model: {model_dir} ({trained})")
    probs = demo_prompts(model_dir, args.num_prompts)
    k = args.num_speculative_tokens

    tool_probs = demo_prompts(model_dir, args.tool_prompts, ("call", "answer"))

    base, base_s, _, base_single, _ = _run(model_dir, probs, 0, args, args.batch1_prompts)
    spec, spec_s, st, spec_single, tool_outs = _run(model_dir, probs, k, args, args.batch1_prompts, tool_probs)

    _print_accuracy(model_dir, probs, base, spec, args.show)
    _print_tool_accuracy(tool_probs, tool_outs)
    _print_speed(probs, k, (base, base_s, base_single), (spec, spec_s, st, spec_single))
    return 0


if __name__ == "__main__":
    sys.exit(main())
