"""One OpenAI API call (a completions or chat completions request) once parsed and prepared: its
prompts' engine requests, their folds turned into OpenAI's response and server-sent-event shapes,
and OpenAI's error object.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from entrypoints.async_llm import EngineUnavailable
from entrypoints.chat_output import ChoiceOutput
from entrypoints.openai_requests import Parsed, param_of
from entrypoints.output_processor import Fold
from entrypoints.reasoning_parser import prompt_opens_reasoning
from model.chat_tokens import THINK_END

if TYPE_CHECKING:
    from entrypoints.openai_server import OpenAIServer


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None,
                   code: str | None = None) -> JSONResponse:
    kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                    503: "service_unavailable"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body was read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _logprob_entry(tokenizer, lp) -> tuple[str, float, list[tuple[str, float]]]:
    """The token's text, its logprob, and the top alternatives' (texts may repeat: byte tokens)."""
    token = tokenizer.decode([lp.token_id], skip_special_tokens=False)
    tops = [(tokenizer.decode([i], skip_special_tokens=False), v) for i, v in zip(lp.top_ids, lp.top_logprobs)]
    return token, lp.logprob, tops


class OpenAICall:
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
            prompt = self.parsed.prompts[0]  # (a chat has one, rendered)
            self.outputs[index] = ChoiceOutput(self.reasoning, self.tools, prompt if isinstance(prompt, str) else None)
        return self.outputs[index]

    def _streams(self) -> list[AsyncIterator[Fold]]:
        llm = self.server.llm
        return [llm.generate(ids, params, f"{self.rid}-{i}", self.parsed.priority,
                             prompt=self.parsed.prompts[i] if isinstance(self.parsed.prompts[i], str) else None,
                             grammar_after=self._grammar_after(params))
                for i, (ids, params) in enumerate(self.prepared)]

    def _grammar_after(self, params) -> int:
        """With the reasoning parser on and the prompt opening the reasoning span, structured
        outputs constrain what follows the span's end token (-1: the whole output)."""
        if not (self.reasoning and params.structured_outputs is not None
                and prompt_opens_reasoning(self.parsed.prompts[0])):
            return -1
        end = self.tok.token_to_id(THINK_END)
        return -1 if end is None else end

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
        choices = [self._choice(i, out, c) for i, out in enumerate(outputs) for c in out.outputs]
        return JSONResponse({"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                             "created": self.created, "model": self.server.model_name, "choices": choices,
                             "usage": self._usage(outputs)})

    def _choice(self, prompt_index: int, out, c) -> dict:
        """A whole answer's choice: completion c of the prompt's output."""
        index = prompt_index * self.n + c.index
        choice = {"index": index, "finish_reason": _openai_finish_reason(c.finish_reason)}
        if self.chat:
            parsed = self._output(index)
            choice["message"] = parsed.message(c.text)
            choice["finish_reason"] = parsed.finish_reason(choice["finish_reason"])
            choice["logprobs"] = self._chat_logprobs(c.logprobs) if c.logprobs is not None else None
        else:
            prompt = self.parsed.prompts[prompt_index]
            prefix = prompt if self.parsed.echo and isinstance(prompt, str) else ""
            choice["text"] = prefix + c.text
            choice["logprobs"] = self._completion_logprobs(c.logprobs, len(prefix)) \
                if c.logprobs is not None else None
        return choice

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
                    if fold.new_token_ids or fold.new_text or fold.finished:
                        # (a chunk per step that made tokens, text or not, as vLLM streams)
                        yield self._chunk([self._delta_choice(i, fold)])
            except EngineUnavailable as e:
                yield _sse_error(str(e), "service_unavailable")
                return
            if self.parsed.include_usage:
                yield self._chunk([], self._usage([outputs[i] for i in sorted(outputs)]))
            yield "data: [DONE]\n\n"
        finally:
            for s in streams:  # a client gone mid-stream: the generators' finally blocks abort their requests
                await s.aclose()

    def _delta_choice(self, prompt_index: int, fold: Fold) -> dict:
        index = self._index(prompt_index, fold)
        reason = _openai_finish_reason(fold.finish_reason)
        want = self.parsed.logprobs is not None
        if self.chat:
            parsed = self._output(index)
            return {"index": index, "delta": parsed.delta(fold.new_text, fold.finished),
                    "logprobs": self._chat_logprobs(fold.new_logprobs) if want else None,
                    "finish_reason": parsed.finish_reason(reason)}
        return {"index": index, "text": fold.new_text,
                "logprobs": self._completion_logprobs(fold.new_logprobs, 0) if want else None,
                "finish_reason": reason}


def _openai_finish_reason(reason: str | None) -> str | None:
    """OpenAI's names: an aborted completion (a stop string, or the server stopping) is "stop"."""
    return "stop" if reason == "abort" else reason


def _sse_error(message: str, kind: str, param: str | None = None) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': kind, 'param': param, 'code': None}})}\n\n"
