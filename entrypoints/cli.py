"""The `mlaserve` command line."""

from __future__ import annotations

import argparse
import sys


def _model_dir(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from model.demo_checkpoint import default_model_dir

    return str(default_model_dir())


def _train_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from model.demo_checkpoint import train_demo

    out = train_demo(Path(args.out_dir), args.seed, args.steps)
    print(f"wrote the demo model (seed {args.seed}) to {out}")
    return 0


def _make_checkpoint(args: argparse.Namespace) -> int:
    from model.checkpoint_maker import make_checkpoint

    out = make_checkpoint(args.preset, args.seed, args.out_dir)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import time

    from engine import LLM, SamplingParams

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
    with LLM(_model_dir(args), dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens,
             max_num_seqs=args.max_num_seqs, block_size=args.block_size, max_model_len=args.max_model_len,
             kv_cache_memory=args.kv_cache_memory,
             gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=not args.no_prefix_caching,
             device=args.device,
             num_speculative_tokens=args.num_speculative_tokens, ep_size=args.ep_size,
             async_scheduling=not args.no_async_scheduling, kv_cache_dtype=args.kv_cache_dtype,
             cuda_graphs=args.cuda_graphs, batch_invariant=args.batch_invariant,
             scheduling_policy=args.scheduling_policy) as llm:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlaserve", description="DeepSeek-V3 serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the published layout")
    mk.add_argument("--preset", choices=["tiny", "small", "demo"], default="tiny",
                    help="random weights in the preset's shape (`train-demo` trains the demo one)")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("out_dir")
    mk.set_defaults(func=_make_checkpoint)
    tr = sub.add_parser("train-demo", help="train the embedded demo model (CPU, minutes) and write it")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("out_dir")
    tr.set_defaults(func=_train_demo)
    sub.add_parser("demo", help="the main job: held-out task prompts through the engine on the demo model "
                   "(`mlaserve demo --help`)")

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
    _add_engine_args(gen)
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="serve the ZeroMQ endpoint (docs/protocol.md) and Prometheus metrics")
    srv.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=5555, help="ZeroMQ ROUTER port (0: any free port)")
    srv.add_argument("--metrics-port", type=int, default=None, help="serve http://METRICS_HOST:PORT/metrics")
    srv.add_argument("--metrics-host", default="127.0.0.1",
                     help="where /metrics listens (loopback by default, whatever --host is)")
    srv.add_argument("--max-completions-per-client", type=int, default=None,
                     help="unfinished completions one connection may hold (default: half of --max-num-seqs)")
    srv.add_argument("--max-prompt-tokens-per-client", type=int, default=None,
                     help="prompt tokens of one connection's unfinished requests (default: the cache's tokens)")
    srv.add_argument("--shutdown-grace", type=float, default=30.0,
                     help="seconds in-flight requests get to finish after SIGTERM")
    srv.add_argument("--seed", type=int, default=0)
    _add_engine_args(srv)
    srv.set_defaults(func=_serve)
    wk = sub.add_parser("worker", help="the expert-parallel workers of one more host (--node-rank >= 1)")
    wk.add_argument("--model", default=None, help="checkpoint directory (the same on every host)")
    wk.add_argument("--seed", type=int, default=0)
    _add_engine_args(wk)
    wk.set_defaults(func=_worker)
    return parser


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="priority: requests' priority (lower sooner) orders admission and preemption")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the longest sequence served, prompt and output (default: the model's context)")
    p.add_argument("--kv-cache-memory", type=int, default=None,
                   help="bytes for the latent cache (default: what --gpu-memory-utilization of a GPU leaves after "
                        "the weights and a step's measured peak; on a CPU 5%% of available memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="the share of the GPU's memory the engine may hold (vLLM's)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="latent cache entries: auto (the model's dtype) or fp8 (e4m3 latents with a power-of-two "
                        "scale per 128, bf16 rope keys: 656 bytes a token instead of 1152)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible), cpu or cuda[:N]")
    p.add_argument("--num-speculative-tokens", type=int, default=0, choices=range(4), metavar="{0..3}",
                   help="MTP draft tokens verified per decode step (0: off)")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="plan each step only after the previous one returns")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay decode steps from CUDA graphs (GPU; not with --ep-size > 1 or speculative decoding)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="each sequence's tokens independent of what is batched with it (GPU kernel path; slower)")
    p.add_argument("--ep-size", type=int, default=1,
                   help="expert-parallel worker processes (each: 1/N of the routed experts, its own cache)")
    p.add_argument("--master-addr", default="127.0.0.1", help="torch.distributed rendezvous address")
    p.add_argument("--master-port", type=int, default=0, help="rendezvous port (0: a free one, one host only)")
    p.add_argument("--nnodes", type=int, default=1, help="hosts taking part (expert parallelism across hosts)")
    p.add_argument("--node-rank", type=int, default=0, help="this host's index; 0 runs the scheduler")
    p.add_argument("--worker-heartbeat-timeout", type=float, default=5.0,
                   help="seconds a worker may send no heartbeat before it is declared stuck and the engine stops")
    p.add_argument("--scheduler-port", type=int, default=0,
                   help="with --nnodes > 1: tcp ports PORT (results) and PORT+1+rank (plans) on master-addr")


def _engine_config(args: argparse.Namespace, model_dir: str):
    from engine.config import EngineConfig

    return EngineConfig(model_dir=model_dir, dtype=args.dtype, block_size=args.block_size,
                        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                        max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        enable_prefix_caching=not args.no_prefix_caching, seed=args.seed, device=args.device,
                        num_speculative_tokens=args.num_speculative_tokens,
                        ep_size=args.ep_size, master_addr=args.master_addr, master_port=args.master_port,
                        nnodes=args.nnodes, node_rank=args.node_rank, scheduler_port=args.scheduler_port,
                        async_scheduling=not args.no_async_scheduling, kv_cache_dtype=args.kv_cache_dtype,
                        cuda_graphs=args.cuda_graphs, batch_invariant=args.batch_invariant,
                        scheduling_policy=args.scheduling_policy,
                        worker_heartbeat_timeout_s=args.worker_heartbeat_timeout)


def _worker(args: argparse.Namespace) -> int:
    from engine.worker_process import run_node_workers

    return run_node_workers(_engine_config(args, _model_dir(args)))


def _serve(args: argparse.Namespace) -> int:
    import logging

    from entrypoints.server import Server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for n in (args.max_completions_per_client, args.max_prompt_tokens_per_client):
        if n is not None and n < 1:
            print(f"error: a per-client limit must be at least 1, got {n}", file=sys.stderr)
            return 2
    config = _engine_config(args, _model_dir(args))
    server = Server(config, args.host, args.port, args.metrics_port, args.shutdown_grace,
                    metrics_host=args.metrics_host, max_completions_per_client=args.max_completions_per_client,
                    max_prompt_tokens_per_client=args.max_prompt_tokens_per_client)
    metrics = f", metrics on http://{args.metrics_host}:{server.metrics_server.server_port}/metrics" \
        if server.metrics_server else ""
    print(f"mlaserve serving {config.model_dir} on {server.address}{metrics}", file=sys.stderr, flush=True)
    return server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # its options are its own (argparse would claim them for the top level)
        from entrypoints.demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
