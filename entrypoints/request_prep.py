"""Request preparation off the server's loop: decoding the parameters, checking them, tokenizing
the prompt and the bad words, compiling the grammar of structured outputs. Each is linear in what
the request carries and bounded by the schema's limits, but a megabyte of prompt is still a tenth
of a second that every stream would wait for on the loop (and a new grammar can take longer).
Tokenizing goes through `encode_batch`, which releases the interpreter, so the loop keeps running
beside it.

A small request (engine/request_input.py: prepare_inline) is prepared at once on the loop instead.
The loop polls `fd` (a pipe) with its sockets and takes finished preparations with `take()`;
`ready` says some are waiting without a wake-up (the inline ones)."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import msgspec

from engine.request_input import RequestInputError, check_priority, prepare_inline, prepare_request
from engine.sampling_params import SamplingParams
from entrypoints.grammars import GrammarPending, Grammars
from entrypoints.protocol import Generate

_params_decoder = msgspec.msgpack.Decoder(SamplingParams)
PARAMS_INLINE = 16 << 10  # encoded parameters (bad words, logit bias) up to this are decoded inline


class Preparer:
    def __init__(self, tokenizer, max_model_len: int, vocab_size: int, grammars: Grammars, threads: int = 4):
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="mlaserve-prepare")
        self._done: deque[tuple[object, Future]] = deque()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self.pending = 0

    @property
    def fd(self) -> int:
        return self._read_fd

    @property
    def ready(self) -> bool:
        return bool(self._done)

    def submit(self, key, msg: Generate) -> None:
        self.pending += 1
        if prepare_inline(msg.prompt) and prepare_inline(msg.prompt_token_ids) and len(msg.params) <= PARAMS_INLINE:
            fut: Future = Future()
            try:
                fut.set_result(self._prepare(msg, compile=False))
            except GrammarPending:  # a grammar to compile: on the pool after all
                fut = None
            except Exception as e:
                fut.set_exception(e)
            if fut is not None:
                self._done.append((key, fut))
                return
        fut = self.pool.submit(self._prepare, msg)
        fut.add_done_callback(lambda f: self._finished(key, f))

    def _finished(self, key, fut: Future) -> None:
        self._done.append((key, fut))
        try:
            os.write(self._write_fd, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def take(self) -> list[tuple[object, tuple[list[int], SamplingParams] | Exception]]:
        """(key, (prompt ids, params) or the exception) for every preparation done."""
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while self._done:
            key, fut = self._done.popleft()
            self.pending -= 1
            exc = fut.exception()
            out.append((key, exc if exc is not None else fut.result()))
        return out

    def _prepare(self, msg: Generate, compile: bool = True) -> tuple[list[int], SamplingParams]:
        if (msg.prompt is None) == (msg.prompt_token_ids is None):
            raise RequestInputError("give exactly one of prompt and prompt_token_ids")
        check_priority(msg.priority)
        try:
            params = _params_decoder.decode(msg.params)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
            raise RequestInputError(f"invalid sampling parameters: {e}") from None
        prompt = msg.prompt if msg.prompt is not None else msg.prompt_token_ids
        ids, params = prepare_request(prompt, params, self.tokenizer, self.max_model_len, self.vocab_size)
        self.grammars.prepare(params, compile=compile)  # (the server's submit finds it cached)
        return ids, params

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        os.close(self._read_fd)
        os.close(self._write_fd)
