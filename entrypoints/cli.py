"""The `mlaserve` command line."""

from __future__ import annotations

import argparse
import os
import sys

from entrypoints.chat_output import REASONING_PARSERS, TOOL_CALL_PARSERS
from entrypoints.engine_args import add_engine_args


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
    with LLM.from_config(engine_config(args, _model_dir(args))) as llm:
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
    add_engine_args(gen, exclude=("seed",))  # --seed is the requests' here
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (--http-port) or the ZeroMQ endpoint "
                         "(docs/protocol.md), with Prometheus metrics")
    srv.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=None,
                     help="ZeroMQ ROUTER port (0: any free port; default 5555 unless --http-port is given)")
    srv.add_argument("--http-port", type=int, default=None,
                     help="serve the OpenAI-compatible HTTP API on this port (0: any free port), /metrics with it")
    srv.add_argument("--api-key", default=None,
                     help="with --http-port: requests to /v1 need `Authorization: Bearer KEY` "
                          "(default: $MLASERVE_API_KEY, if set)")
    srv.add_argument("--served-model-name", default=None, help="the model's name in the API (default: its folder)")
    srv.add_argument("--chat-template", default=None, metavar="FILE",
                     help="with --http-port: a Jinja chat template that replaces the checkpoint's")
    srv.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                     help="with --http-port: return the reasoning span apart, as message.reasoning_content")
    srv.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                     help="with --http-port and --enable-auto-tool-choice: return the model's tool calls as tool_calls")
    srv.add_argument("--enable-auto-tool-choice", action="store_true",
                     help="let the model call the request's tools (tool_choice auto); needs --tool-call-parser")
    srv.add_argument("--metrics-port", type=int, default=None, help="serve http://METRICS_HOST:PORT/metrics")
    srv.add_argument("--metrics-host", default="127.0.0.1",
                     help="where /metrics listens (loopback by default, whatever --host is)")
    srv.add_argument("--max-completions-per-client", type=int, default=None,
                     help="unfinished completions one connection may hold (default: half of --max-num-seqs)")
    srv.add_argument("--max-prompt-tokens-per-client", type=int, default=None,
                     help="prompt tokens of one connection's unfinished requests (default: the cache's tokens)")
    srv.add_argument("--shutdown-grace", type=float, default=30.0,
                     help="seconds in-flight requests get to finish after SIGTERM")
    add_engine_args(srv)
    srv.set_defaults(func=_serve)
    wk = sub.add_parser("worker", help="the expert-parallel workers of one more host (--node-rank >= 1)")
    wk.add_argument("--model", default=None, help="checkpoint directory (the same on every host)")
    add_engine_args(wk)
    wk.set_defaults(func=_worker)
    return parser


def _worker(args: argparse.Namespace) -> int:
    from engine.worker_process import run_node_workers
    from entrypoints.engine_args import engine_config

    return run_node_workers(engine_config(args, _model_dir(args)))


def _serve(args: argparse.Namespace) -> int:
    import logging

    from entrypoints.engine_args import engine_config
    from entrypoints.server import Server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for n in (args.max_completions_per_client, args.max_prompt_tokens_per_client):
        if n is not None and n < 1:
            print(f"error: a per-client limit must be at least 1, got {n}", file=sys.stderr)
            return 2
    if args.chat_template is not None and not os.path.isfile(args.chat_template):
        print(f"error: --chat-template {args.chat_template}: no such file", file=sys.stderr)
        return 2
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        print("error: --enable-auto-tool-choice needs --tool-call-parser", file=sys.stderr)
        return 2
    config = engine_config(args, _model_dir(args))
    if args.http_port is not None:
        return _serve_http(args, config)
    args.port = 5555 if args.port is None else args.port
    server = Server(config, args.host, args.port, args.metrics_port, args.shutdown_grace,
                    metrics_host=args.metrics_host, max_completions_per_client=args.max_completions_per_client,
                    max_prompt_tokens_per_client=args.max_prompt_tokens_per_client)
    metrics = f", metrics on http://{args.metrics_host}:{server.metrics_server.server_port}/metrics" \
        if server.metrics_server else ""
    print(f"mlaserve serving {config.model_dir} on {server.address}{metrics}", file=sys.stderr, flush=True)
    return server.serve_forever()


def _serve_http(args: argparse.Namespace, config) -> int:
    """The HTTP API; with --port too, the ZeroMQ endpoint beside it on a thread of its own, both
    frontends over the one engine (SIGTERM drains both)."""
    import os
    import threading
    from pathlib import Path

    from entrypoints.async_llm import AsyncLLM
    from entrypoints.openai_server import run_http
    from entrypoints.server import Server

    name = args.served_model_name or Path(config.model_dir).name
    template = Path(args.chat_template).read_text() if args.chat_template else None  # (fails before the engine starts)
    api_key = args.api_key or os.environ.get("MLASERVE_API_KEY") or None
    llm = AsyncLLM(config)
    zmq_server = zmq_thread = None
    try:
        if args.port is not None:
            zmq_server = Server(config, args.host, args.port, args.metrics_port, args.shutdown_grace, name,
                                args.metrics_host, args.max_completions_per_client,
                                args.max_prompt_tokens_per_client, engine=llm.share("s"))
            zmq_thread = threading.Thread(target=zmq_server.serve_forever, kwargs={"install_signals": False},
                                          name="mlaserve-zmq")
    except BaseException:
        llm.shutdown("the ZeroMQ endpoint did not start")
        raise

    def ready(port: int) -> None:
        if zmq_server is not None:
            zmq_thread.start()
            metrics = f", metrics on http://{args.metrics_host}:{zmq_server.metrics_server.server_port}/metrics" \
                if zmq_server.metrics_server else ""
            print(f"mlaserve serving {config.model_dir} on {zmq_server.address}{metrics}", file=sys.stderr,
                  flush=True)
        print(f"mlaserve serving {config.model_dir} as {name!r} on http://{args.host}:{port}/v1 "
              f"(metrics on /metrics)", file=sys.stderr, flush=True)

    def stopping() -> None:
        if zmq_server is not None:
            zmq_server.request_stop()

    def drained() -> None:  # the ZeroMQ side is done before the engine stops
        if zmq_thread is None:
            return
        if zmq_thread.ident is None:  # the HTTP side never started
            zmq_server.close()
        zmq_thread.join(args.shutdown_grace + 10)

    return run_http(llm, args.host, args.http_port, name, api_key, args.shutdown_grace, on_ready=ready,
                    on_stop=stopping, before_engine_stop=drained,
                    parsers=(args.reasoning_parser, args.tool_call_parser if args.enable_auto_tool_choice else None),
                    chat_template=template)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # its options are its own (argparse would claim them for the top level)
        from entrypoints.demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
