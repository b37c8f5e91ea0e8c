"""The `mlaserve` command line."""

from __future__ import annotations

import argparse
import os
import sys

from entrypoints.engine_args import add_engine_args, model_dir_of
from entrypoints.serve_cli import add_serve_parser


def _train_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from model.demo_checkpoint import train_demo

    out = train_demo(Path(args.out_dir), args.seed, args.steps)
    print(f"wrote the demo model (seed {args.seed}) to {out}")
    return 0


def _make_checkpoint(args: argparse.Namespace) -> int:
    from model.checkpoint_maker import make_checkpoint

    out = make_checkpoint(args.preset, args.seed, args.out_dir, router_skew=args.router_skew)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import time

    from engine import LLM, SamplingParams
    from entrypoints.engine_args import engine_config

    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    else:
        prompts = args.prompt
    if not prompts:
        print("error: give --prompt TEXT (repeatable) or --prompts-file FILE", file=sys.stderr)
        return 2
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos, n=args.n)
    with LLM.from_config(engine_config(args, model_dir_of(args))) as llm:
        ready = llm.engine.ready
        peak = f"; a step's activations peak at {ready.step_peak_bytes / (1 << 20):.0f} MiB" \
            if ready.step_peak_bytes else ""
        print(f"latent cache: {llm.kv_cache_tokens} tokens of {ready.kv_bytes_per_token} bytes each{peak}",
              file=sys.stderr)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
        elapsed = time.perf_counter() - start
    for i, out in enumerate(outs):
        for c in out.outputs:
            body = c.text if out.error is None else f"[error] {out.error}"
            which = f"[{i}]" if len(out.outputs) == 1 else f"[{i}.{c.index}]"
            print(f"--- {which} {out.prompt!r} ({c.finish_reason})\n{body}")
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    print(f"throughput: {len(outs) / elapsed:.2f} requests/s, {n_out / elapsed:.1f} output tokens/s, "
          f"{(n_in + n_out) / elapsed:.1f} total tokens/s ({len(outs)} requests, {elapsed:.2f} s)")
    return 0


def _add_checkpoint_parsers(sub) -> None:
    mk = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the published layout")
    mk.add_argument("--preset", choices=["tiny", "small", "demo"], default="tiny",
                    help="random weights in the preset's shape (`train-demo` trains the demo one)")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--router-skew", type=float, default=0.0,
                    help="tilt the routers towards the lowest-numbered experts by up to this much (uneven expert "
                         "load on random weights, for expert-parallel balance benchmarks)")
    mk.add_argument("out_dir")
    mk.set_defaults(func=_make_checkpoint)
    tr = sub.add_parser("train-demo", help="train the embedded demo model (CPU, minutes) and write it")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("out_dir")
    tr.set_defaults(func=_train_demo)
    sub.add_parser("demo", help="the main job: held-out task prompts through the engine on the demo model "
                   "(`mlaserve demo --help`)")


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="run prompts through the engine and print completions")
    gen.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="one prompt per line (\\n for newlines)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--n", type=int, default=1, help="completions per prompt (they share its cache blocks)")
    add_engine_args(gen, exclude=("seed",))  # --seed is the requests' here
    gen.set_defaults(func=_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlaserve", description="DeepSeek-V3 serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_checkpoint_parsers(sub)
    _add_generate_parser(sub)
    add_serve_parser(sub)
    wk = sub.add_parser("worker", help="the expert-parallel workers of one more host (--node-rank >= 1)")
    wk.add_argument("--model", default=None, help="checkpoint directory (the same on every host)")
    add_engine_args(wk)
    wk.set_defaults(func=_worker)
    return parser


def _worker(args: argparse.Namespace) -> int:
    from engine.worker_process import run_node_workers
    from entrypoints.engine_args import engine_config

    return run_node_workers(engine_config(args, model_dir_of(args)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # its options are its own (argparse would claim them for the top level)
        from entrypoints.demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # options or a checkpoint that cannot work: the reason, not a traceback
        if os.environ.get("MLASERVE_TRACEBACK"):
            raise
        print(f"mlaserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
