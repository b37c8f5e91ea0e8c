"""`mlaserve serve`: its flags, and the endpoints it starts (the ZeroMQ endpoint, the HTTP API,
or both over one engine)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from entrypoints.chat_output import REASONING_PARSERS, TOOL_CALL_PARSERS
from entrypoints.engine_args import add_engine_args, engine_config, model_dir_of


def add_serve_parser(sub) -> None:
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (--http-port) or the ZeroMQ endpoint "
                         "(docs/protocol.md), with Prometheus metrics")
    srv.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=None,
                     help="ZeroMQ ROUTER port (0: any free port; default 5555 unless --http-port is given)")
    srv.add_argument("--shutdown-grace", type=float, default=30.0,
                     help="seconds in-flight requests get to finish after SIGTERM")
    _add_http_args(srv)
    _add_zmq_args(srv)
    add_engine_args(srv)
    srv.set_defaults(func=serve)


def _add_http_args(srv: argparse.ArgumentParser) -> None:
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


def _add_zmq_args(srv: argparse.ArgumentParser) -> None:
    srv.add_argument("--metrics-port", type=int, default=None, help="serve http://METRICS_HOST:PORT/metrics")
    srv.add_argument("--metrics-host", default="127.0.0.1",
                     help="where /metrics listens (loopback by default, whatever --host is)")
    srv.add_argument("--max-completions-per-client", type=int, default=None,
                     help="unfinished completions one connection may hold (default: half of --max-num-seqs)")
    srv.add_argument("--max-prompt-tokens-per-client", type=int, default=None,
                     help="prompt tokens of one connection's unfinished requests (default: the cache's tokens)")


def _flag_problem(args: argparse.Namespace) -> str | None:
    for n in (args.max_completions_per_client, args.max_prompt_tokens_per_client):
        if n is not None and n < 1:
            return f"a per-client limit must be at least 1, got {n}"
    if args.chat_template is not None and not os.path.isfile(args.chat_template):
        return f"--chat-template {args.chat_template}: no such file"
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        return "--enable-auto-tool-choice needs --tool-call-parser"
    return None


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if (problem := _flag_problem(args)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    config = engine_config(args, model_dir_of(args))
    if args.http_port is not None:
        return _serve_http(args, config)
    args.port = 5555 if args.port is None else args.port
    server = _zmq_server(args, config, None)
    _announce_zmq(server, args, config)
    return server.serve_forever()


def _zmq_server(args: argparse.Namespace, config, llm):
    """The ZeroMQ endpoint; over `llm` (the HTTP API's engine) when given, else its own."""
    from entrypoints.server import Server

    return Server(config, args.host, args.port, args.metrics_port, args.shutdown_grace,
                  args.served_model_name, args.metrics_host, args.max_completions_per_client,
                  args.max_prompt_tokens_per_client, llm=llm)


def _announce_zmq(server, args: argparse.Namespace, config) -> None:
    metrics = f", metrics on http://{args.metrics_host}:{server.metrics_server.server_port}/metrics" \
        if server.metrics_server else ""
    print(f"mlaserve serving {config.model_dir} on {server.address}{metrics}", file=sys.stderr, flush=True)


def _serve_http(args: argparse.Namespace, config) -> int:
    """The HTTP API; with --port too, the ZeroMQ endpoint beside it on the same loop over the same
    engine (SIGTERM drains both)."""
    from entrypoints.async_llm import AsyncLLM
    from entrypoints.openai_server import run_http

    name = args.served_model_name or Path(config.model_dir).name
    template = Path(args.chat_template).read_text() if args.chat_template else None  # (fails before the engine starts)
    api_key = args.api_key or os.environ.get("MLASERVE_API_KEY") or None
    llm = AsyncLLM(config)
    try:
        beside = _zmq_server(args, config, llm) if args.port is not None else None
    except BaseException:
        llm.shutdown("the ZeroMQ endpoint did not start")
        raise

    def ready(port: int) -> None:
        if beside is not None:
            _announce_zmq(beside, args, config)
        print(f"mlaserve serving {config.model_dir} as {name!r} on http://{args.host}:{port}/v1 "
              f"(metrics on /metrics)", file=sys.stderr, flush=True)

    return run_http(llm, args.host, args.http_port, name, api_key, args.shutdown_grace, on_ready=ready,
                    beside=beside,
                    parsers=(args.reasoning_parser, args.tool_call_parser if args.enable_auto_tool_choice else None),
                    chat_template=template)
