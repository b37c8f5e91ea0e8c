"""The OpenAI-compatible HTTP API (vLLM's `vllm serve` surface) over the asynchronous engine client:
POST /v1/completions and /v1/chat/completions (streaming as server-sent events), GET /v1/models,
/health, /metrics, POST /tokenize and /detokenize. FastAPI on uvicorn; errors in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest

from engine.request_input import RequestInputError
from entrypoints.async_llm import AsyncLLM
from entrypoints.chat_format import ChatFormatError, ChatFormatter
from entrypoints.metrics import EngineCollector
from entrypoints.openai_call import OpenAICall, error_response
from entrypoints.openai_requests import InvalidParameter, Parsed, chat_request, completion_request, param_of

log = logging.getLogger("mlaserve.http")

MAX_BODY_BYTES = 16 << 20


class _ApiKey:
    """`Authorization: Bearer KEY` on every /v1 route. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware would pass every streamed chunk through a task and a memory stream more."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                await error_response(401, "missing or wrong API key (Authorization: Bearer ...)")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Refused(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response


async def _body(request: Request) -> dict:
    """The JSON object of the body, read only up to MAX_BODY_BYTES (a longer one is refused while
    it comes, never held whole)."""
    too_long = error_response(413, f"the body is longer than {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _Refused(too_long)
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise _Refused(too_long)
        parts.append(part)
    raw = b"".join(parts)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _Refused(error_response(400, f"the body is not JSON: {e}")) from None
    if not isinstance(body, dict):
        raise _Refused(error_response(400, "the body must be a JSON object"))
    return body


class OpenAIServer:
    def __init__(self, llm: AsyncLLM, model_name: str, api_key: str | None = None,
                 parsers: tuple[str | None, str | None] = (None, None), chat_template: str | None = None):
        """parsers: the reasoning parser and the tool-call parser (None: off; the tool-call one is
        given only with --enable-auto-tool-choice); chat_template: replaces the checkpoint's."""
        self.llm = llm
        self.reasoning_parser, self.tool_call_parser = parsers
        self.model_name = model_name
        self.api_key = api_key
        self.chat = ChatFormatter(llm.config.model_dir, chat_template)
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(llm))
        self.app = self._build()

    # ---- the app ------------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI(title="mlaserve", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics, methods=["GET"])
        app.add_api_route("/tokenize", self.tokenize, methods=["POST"])
        app.add_api_route("/detokenize", self.detokenize, methods=["POST"])
        app.add_exception_handler(_Refused, lambda _request, refused: refused.response)
        if self.api_key is not None:
            app.add_middleware(_ApiKey, key=self.api_key)
        return app

    async def health(self) -> Response:
        h = self.llm.health()
        if h.status == "ok":
            return PlainTextResponse("ok")
        return PlainTextResponse(f"{h.status}: {h.reason}" if h.reason else h.status, status_code=503)

    async def metrics(self) -> Response:
        return Response(generate_latest(self.registry), media_type="text/plain; version=0.0.4")

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "mlaserve", "max_model_len": self.llm.ready.max_model_len}]}

    async def tokenize(self, request: Request) -> Response:
        body = await _body(request)
        try:
            if "messages" in body:
                text = self.chat.render(body["messages"])
            elif isinstance(body.get("prompt"), str):
                text = body["prompt"]
            else:
                return error_response(400, "give prompt (a string) or messages", "prompt")
        except ChatFormatError as e:
            return error_response(400, str(e), "messages")
        ids = self.llm.tokenizer.encode(text, add_special_tokens=False).ids
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.llm.ready.max_model_len})

    async def detokenize(self, request: Request) -> Response:
        body = await _body(request)
        tokens = body.get("tokens")
        vocab = self.llm.ready.vocab_size
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                   for t in tokens):
            return error_response(400, f"tokens must be a list of token ids in [0, {vocab})", "tokens")
        return JSONResponse({"prompt": self.llm.tokenizer.decode(tokens, skip_special_tokens=False)})

    # ---- generation ---------------------------------------------------------------------------

    def _check_model(self, body: dict) -> JSONResponse | None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            return error_response(404, f"the model {model!r} does not exist; this server serves "
                                  f"{self.model_name!r}", "model", code="model_not_found")
        return None

    def _unavailable(self) -> JSONResponse | None:
        h = self.llm.health()
        if h.status != "ok":
            return error_response(503, f"the engine failed: {h.reason}" if h.reason else
                                  "the server is stopping and takes no new requests")
        return None

    async def completions(self, request: Request) -> Response:
        body = await _body(request)
        if (refusal := self._check_model(body) or self._unavailable()) is not None:
            return refusal
        try:
            parsed = completion_request(body)
        except InvalidParameter as e:
            return error_response(400, str(e), e.param)
        return await self._serve(request, parsed, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = await _body(request)
        if (refusal := self._check_model(body) or self._unavailable()) is not None:
            return refusal
        try:
            messages, parsed = chat_request(body)
            parsed.prompts = [self.chat.render(messages, parsed.tools, parsed.template_kwargs)]
        except InvalidParameter as e:
            return error_response(400, str(e), e.param)
        except ChatFormatError as e:
            return error_response(400, str(e), "messages")
        return await self._serve(request, parsed, chat=True)

    async def _serve(self, request: Request, parsed: Parsed, chat: bool) -> Response:
        prepared = []
        try:
            for prompt in parsed.prompts:
                prepared.append(await self.llm.prepare(prompt, parsed.params, parsed.priority))
        except RequestInputError as e:
            return error_response(400, str(e), param_of(str(e)))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        call = OpenAICall(self, rid, parsed, prepared, chat)
        if parsed.stream:
            return StreamingResponse(call.stream(), media_type="text/event-stream")
        return await call.complete(request)


def run_http(llm: AsyncLLM, host: str, port: int, model_name: str, api_key: str | None = None,
             grace_s: float = 30.0, on_ready=None, beside=None,
             parsers: tuple[str | None, str | None] = (None, None), chat_template: str | None = None) -> int:
    """Serves until SIGTERM/SIGINT (uvicorn drains in-flight requests for `grace_s`), then stops
    the engine. `beside`: the ZeroMQ server (entrypoints/server.py) to run on the same loop over
    the same engine, stopped and drained with the HTTP side. Returns 1 when the engine had failed."""
    import uvicorn

    server = OpenAIServer(llm, model_name, api_key, parsers, chat_template)

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            llm.start(asyncio.get_running_loop())
            if beside is not None:
                beside.start(asyncio.get_running_loop())
            await super().startup(sockets)
            if on_ready is not None and self.servers:
                on_ready(self.servers[0].sockets[0].getsockname()[1])

        async def shutdown(self, sockets=None):
            llm.stopping = True
            if beside is not None:
                beside.request_stop()
            await super().shutdown(sockets)
            if beside is not None:
                await beside.stopped()

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # uvicorn raises the signal again once it stopped (the process then dies of it, before
            # the engine is stopped); here the exit status says whether the engine had failed.
            self._captured_signals.clear()

    config = uvicorn.Config(server.app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=int(grace_s), lifespan="off")
    try:
        _Server(config).run()
    finally:
        if beside is not None:
            beside.close()
        llm.shutdown("the HTTP server stopped")
    return 0 if llm.failure is None else 1
