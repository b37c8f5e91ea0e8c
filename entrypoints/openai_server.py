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
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest

from engine.request_input import RequestInputError
from entrypoints.async_llm import AsyncLLM, EngineUnavailable
from entrypoints.chat_format import ChatFormatError, ChatFormatter
from entrypoints.chat_output import ChoiceOutput
from entrypoints.metrics import EngineCollector
from entrypoints.openai_requests import InvalidParameter, Parsed, chat_request, completion_request, param_of
from entrypoints.output_processor import Fold

log = logging.getLogger("mlaserve.http")

MAX_BODY_BYTES = 16 << 20


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None,
                   code: str | None = None) -> JSONResponse:
    kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                    503: "service_unavailable"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


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


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body was read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _logprob_entry(tokenizer, lp) -> tuple[str, float, list[tuple[str, float]]]:
    """The token's text, its logprob, and the top alternatives' (texts may repeat: byte tokens)."""
    token = tokenizer.decode([lp.token_id], skip_special_tokens=False)
    tops = [(tokenizer.decode([i], skip_special_tokens=False), v) for i, v in zip(lp.top_ids, lp.top_logprobs)]
    return token, lp.logprob, tops


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
        call = _Call(self, rid, parsed, prepared, chat)
        if parsed.stream:
            return StreamingResponse(call.stream(), media_type="text/event-stream")
        return await call.complete(request)


class _Call:
    """One HTTP request: its prompts' engine requests, folded into OpenAI's shapes."""

    def __init__(self, server: OpenAIServer, rid: str, parsed: Parsed, prepared: list, chat: bool):
        self.server, self.rid, self.parsed, self.prepared, self.chat = server, rid, parsed, prepared, chat
        self.created = int(time.time())
        self.n = prepared[0][1].n if prepared else 1
        self.tok = server.llm.tokenizer
        self.reasoning = chat and server.reasoning_parser is not None
        self.tools = (chat and server.tool_call_parser is not None and bool(parsed.tools)
                      and parsed.tool_choice != "none")
        self.outputs: dict[int, ChoiceOutput] = {}  # chat choices by index

    def _output(self, index: int) -> ChoiceOutput:
        if index not in self.outputs:
            self.outputs[index] = ChoiceOutput(self.reasoning, self.tools)
        return self.outputs[index]

    def _streams(self) -> list[AsyncIterator[Fold]]:
        llm = self.server.llm
        return [llm.generate(ids, params, f"{self.rid}-{i}", self.parsed.priority,
                             prompt=self.parsed.prompts[i] if isinstance(self.parsed.prompts[i], str) else None)
                for i, (ids, params) in enumerate(self.prepared)]

    def _index(self, prompt_index: int, fold: Fold) -> int:
        return prompt_index * self.n + fold.completion.index

    def _usage(self, outputs) -> dict:
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self.reasoning:  # the reasoning span's tokens, as they tokenize alone
            texts = [o.reasoning_text for o in self.outputs.values() if o.reasoning_text]
            reasoning = sum(len(e.ids) for e in self.tok.encode_batch(texts, add_special_tokens=False)) if texts else 0
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        return usage


    def _completion_logprobs(self, lps, offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for lp in lps:
            token, value, top = _logprob_entry(self.tok, lp)
            offsets.append(offset)
            offset += len(token)
            tokens.append(token)
            token_lps.append(value)
            tops.append({t: v for t, v in reversed(top)})  # OpenAI's shape keys by text: the best one wins
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, lps) -> dict:
        content = []
        for lp in lps:
            token, value, top = _logprob_entry(self.tok, lp)
            content.append({"token": token, "logprob": value, "bytes": list(token.encode()),
                            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                             for t, v in top]})
        return {"content": content}

    # ---- whole answers ------------------------------------------------------------------------

    async def complete(self, request: Request) -> Response:
        task = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not task.done():  # the client left before its answer
            task.cancel()  # its generators' finally blocks abort what still runs
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
            return Response(status_code=499)
        try:
            outputs = task.result()
        except EngineUnavailable as e:
            return error_response(503, str(e))
        errors = [o.error for o in outputs if o.error]
        if errors:
            return error_response(400, errors[0], param_of(errors[0]))
        choices = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                index = i * self.n + c.index
                choice = {"index": index, "finish_reason": _openai_finish_reason(c.finish_reason)}
                if self.chat:
                    parsed = self._output(index)
                    choice["message"] = parsed.message(c.text)
                    choice["finish_reason"] = parsed.finish_reason(choice["finish_reason"])
                    choice["logprobs"] = self._chat_logprobs(c.logprobs) if c.logprobs is not None else None
                else:
                    prefix = self.parsed.prompts[i] if self.parsed.echo and isinstance(self.parsed.prompts[i], str) \
                        else ""
                    choice["text"] = prefix + c.text
                    choice["logprobs"] = self._completion_logprobs(c.logprobs, len(prefix)) \
                        if c.logprobs is not None else None
                choices.append(choice)
        return JSONResponse({"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                             "created": self.created, "model": self.server.model_name, "choices": choices,
                             "usage": self._usage(outputs)})

    async def _collect(self):
        async def one(stream):
            last = None
            async for fold in stream:
                last = fold
            return last.output

        return await asyncio.gather(*(one(s) for s in self._streams()))

    # ---- streams ------------------------------------------------------------------------------

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        obj = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.server.model_name, "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def _merged(self, streams: list) -> AsyncIterator[tuple[int, Fold]]:
        """(prompt index, fold) of every stream as they come; one stream is read directly."""
        if len(streams) == 1:
            async for fold in streams[0]:
                yield 0, fold
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            try:
                async for fold in stream:
                    await queue.put((i, fold))
            except Exception as e:  # (the engine failed): the merged stream raises it
                await queue.put((i, e))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            live = len(streams)
            while live:
                i, item = await queue.get()
                if item is None:
                    live -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def stream(self) -> AsyncIterator[str]:
        streams = self._streams()
        outputs: dict[int, object] = {}
        try:
            if self.chat:
                yield self._chunk([{"index": i * self.n + j, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}
                                   for i in range(len(streams)) for j in range(self.n)])
            try:
                async for i, fold in self._merged(streams):
                    outputs[i] = fold.output
                    if fold.finish_reason == "error":
                        message = fold.output.error or "rejected by the engine"
                        yield _sse_error(message, "invalid_request_error", param_of(message))
                        return
                    if not (fold.new_token_ids or fold.new_text or fold.finished):
                        continue  # (a chunk per step that made tokens, text or not, as vLLM streams)
                    index = self._index(i, fold)
                    reason = _openai_finish_reason(fold.finish_reason)
                    want = self.parsed.logprobs is not None
                    if self.chat:
                        parsed = self._output(index)
                        choice = {"index": index, "delta": parsed.delta(fold.new_text, fold.finished),
                                  "logprobs": self._chat_logprobs(fold.new_logprobs) if want else None,
                                  "finish_reason": parsed.finish_reason(reason)}
                    else:
                        choice = {"index": index, "text": fold.new_text,
                                  "logprobs": self._completion_logprobs(fold.new_logprobs, 0) if want else None,
                                  "finish_reason": reason}
                    yield self._chunk([choice])
            except EngineUnavailable as e:
                yield _sse_error(str(e), "service_unavailable")
                return
            if self.parsed.include_usage:
                yield self._chunk([], self._usage([outputs[i] for i in sorted(outputs)]))
            yield "data: [DONE]\n\n"
        finally:
            for s in streams:  # a client gone mid-stream: the generators' finally blocks abort their requests
                await s.aclose()


def _openai_finish_reason(reason: str | None) -> str | None:
    """OpenAI's names: an aborted completion (a stop string, or the server stopping) is "stop"."""
    return "stop" if reason == "abort" else reason


def _sse_error(message: str, kind: str, param: str | None = None) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': kind, 'param': param, 'code': None}})}\n\n"


def run_http(llm: AsyncLLM, host: str, port: int, model_name: str, api_key: str | None = None,
             grace_s: float = 30.0, on_ready=None, on_stop=None, before_engine_stop=None,
             parsers: tuple[str | None, str | None] = (None, None), chat_template: str | None = None) -> int:
    """Serves until SIGTERM/SIGINT (uvicorn drains in-flight requests for `grace_s`), then stops
    the engine. Returns 1 when the engine had failed."""
    import uvicorn

    server = OpenAIServer(llm, model_name, api_key, parsers, chat_template)

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            llm.start(asyncio.get_running_loop())
            await super().startup(sockets)
            if on_ready is not None and self.servers:
                on_ready(self.servers[0].sockets[0].getsockname()[1])

        async def shutdown(self, sockets=None):
            llm.stopping = True
            if on_stop is not None:
                on_stop()
            await super().shutdown(sockets)

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
        if before_engine_stop is not None:
            before_engine_stop()
        llm.shutdown("the HTTP server stopped")
    return 0 if llm.failure is None else 1
