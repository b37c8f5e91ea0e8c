"""Structured outputs on the frontend: each request's constraint (SamplingParams.structured_outputs)
compiled by xgrammar against the checkpoint's tokenizer, cached by the constraint, and serialized
for the worker (engine/messages.py: GrammarPlan). Compiling is the only slow part (milliseconds
to a second, by the schema and the vocabulary), so it happens where preparing does (the caller's
thread offline, a pool thread in the servers): the request waits for it, the batch does not. A
constraint xgrammar refuses fails its request with xgrammar's reason.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from pathlib import Path

from engine.messages import GrammarPlan
from engine.request_input import RequestInputError
from engine.sampling_params import SamplingParams, StructuredOutputsParams

CACHE_SIZE = 256  # compiled constraints kept
# xgrammar's errors start with a timestamp and a source location: "[19:49:09] /project/cpp/x.cc:94: "
_LOCATION = re.compile(r"^\[[\d:.]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarPending(Exception):
    """The constraint is not compiled yet, and the caller is a loop that must not compile it."""


class Grammars:
    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_id: int | None):
        self._args = (model_dir, vocab_size, eos_token_id)
        self._compiler = None
        self._compiler_lock = threading.Lock()  # (held while the first compiler is built: a second)
        self._lock = threading.Lock()
        self._plans: OrderedDict[str, GrammarPlan] = OrderedDict()  # by constraint key, least recent first

    def prepare(self, params: SamplingParams, start_after: int = -1, compile: bool = True) -> GrammarPlan | None:
        """The request's compiled grammar (None when it has no constraint). Raises
        RequestInputError naming what xgrammar refused, or GrammarPending when it is not cached
        and `compile` is False."""
        spec = params.structured_outputs
        if spec is None:
            return None
        try:
            key = spec.key()
        except ValueError as e:
            raise RequestInputError(str(e), params) from None
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
        if plan is None:
            if not compile:
                raise GrammarPending(key)
            plan = GrammarPlan(key, self._compile(spec, params))
            with self._lock:
                self._plans[key] = plan
                if len(self._plans) > CACHE_SIZE:
                    self._plans.popitem(last=False)
        return plan if start_after < 0 else GrammarPlan(plan.key, plan.blob, start_after)

    def _compile(self, spec: StructuredOutputsParams, params: SamplingParams) -> str:
        compiler = self._get_compiler()
        kind = spec.kinds[0]
        whitespace = not spec.disable_any_whitespace
        try:
            if kind == "json":
                compiled = compiler.compile_json_schema(spec.with_schema_text().json, any_whitespace=whitespace)
            elif kind == "json_object":
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=whitespace)
            elif kind == "regex":
                compiled = compiler.compile_regex(spec.regex)
            elif kind == "choice":
                # EBNF string literals take JSON's escapes (not ASCII-only: xgrammar reads no surrogate pairs)
                compiled = compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice))
            else:
                compiled = compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            reason = _LOCATION.sub("", str(e).strip()).strip()
            raise RequestInputError(f"structured_outputs.{kind} could not be compiled: {reason}", params) from None
        return compiled.serialize_json()

    def _get_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr

                from model.grammar_mask import tokenizer_info

                # cache_enabled=False: this object's plans are the cache (xgrammar's own would
                # hold every schema ever seen, unbounded).
                self._compiler = xgr.GrammarCompiler(tokenizer_info(*self._args), max_threads=2,
                                                     cache_enabled=False)
            return self._compiler
