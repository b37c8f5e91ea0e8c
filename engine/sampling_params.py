"""Per-request sampling parameters, as a plain typed message (it crosses process boundaries)."""

from __future__ import annotations

import functools
import json
import math
from typing import Annotated, Any

import msgspec

MAX_PARALLEL_SAMPLES = 256  # n above this is refused: each completion is a sequence the engine tracks
INT64 = (-(1 << 63), (1 << 63) - 1)  # every integer that crosses a process boundary fits msgpack's int64
MAX_TOKENS_LIMIT = (1 << 31) - 1  # max_tokens, min_tokens, top_k, truncate_prompt_tokens
# A penalty scales logits by 1/penalty or penalty: past these bounds float32 logits reach
# infinity (0 or inf in float32 for 1e-300), whose softmax is NaN.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
# What one request may carry in its lists. Each is work per request (tokenizing bad words) or per
# generated token (looking for stop strings, banning bad words), done where others wait, so each
# is bounded; the schema checks the lengths before their elements are read.
MAX_STOP_STRINGS = 128
MAX_STOP_STRING_CHARS = 1024
MAX_BAD_WORDS = 1024
MAX_BAD_WORD_TOKENS = 64
MAX_TOKEN_LIST = 1 << 17  # stop_token_ids, allowed_token_ids, logit_bias entries: a vocabulary's worth


def _at_most(n: int):
    return msgspec.Meta(max_length=n)


# A grammar is compiled on a frontend's thread pool, in time about linear in its text: these keep
# one request's compile to a fraction of a second.
MAX_GRAMMAR_CHARS = 1 << 18  # a schema (as JSON text), a regex or an EBNF grammar
MAX_CHOICES = 4096
MAX_CHOICE_CHARS = 1024


def _overlong_schema(text: str) -> str:
    return f"structured_outputs.json is {len(text)} characters, more than {MAX_GRAMMAR_CHARS}"


class StructuredOutputsParams(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Constrains a completion to a grammar (vLLM's StructuredOutputsParams): exactly one of a JSON
    schema (an object, or its JSON text), a regex the whole output matches, a list of choices, an
    EBNF grammar (xgrammar's dialect, GBNF-like), or any JSON object."""
    json: str | dict[str, Any] | None = None
    regex: Annotated[str, _at_most(MAX_GRAMMAR_CHARS)] | None = None
    choice: Annotated[list[Annotated[str, _at_most(MAX_CHOICE_CHARS)]], _at_most(MAX_CHOICES)] | None = None
    grammar: Annotated[str, _at_most(MAX_GRAMMAR_CHARS)] | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False  # JSON without whitespace between its tokens

    @property
    def kinds(self) -> list[str]:
        return [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None] + (
            ["json_object"] if self.json_object else [])

    def problems(self) -> list[str]:
        kinds = self.kinds
        if len(kinds) != 1:
            return [f"structured_outputs takes exactly one of json, regex, choice, grammar and json_object, "
                    f"got {', '.join(kinds) if kinds else 'none'}"]
        if self.choice is not None and not self.choice:
            return ["structured_outputs.choice must not be empty"]
        if isinstance(self.json, str) and len(self.json) > MAX_GRAMMAR_CHARS:
            return [_overlong_schema(self.json)]
        return []

    def with_schema_text(self) -> StructuredOutputsParams:
        """These parameters with a schema object written as JSON text, keys sorted (so equal schemas
        are one cache entry, and the engine's processes pass a string on). Raises ValueError for a
        schema that JSON cannot write (NaN, nesting past the interpreter's depth) or an overlong one."""
        if self.json is None or isinstance(self.json, str):
            return self
        try:
            text = json.dumps(self.json, sort_keys=True, allow_nan=False)
        except (ValueError, TypeError, RecursionError) as e:
            raise ValueError(f"structured_outputs.json is not a JSON schema: {e}") from None
        if len(text) > MAX_GRAMMAR_CHARS:
            raise ValueError(_overlong_schema(text))
        return msgspec.structs.replace(self, json=text)

    def key(self) -> str:
        """The constraint as one string, the same for equal constraints (the grammar caches' key)."""
        kind = self.kinds[0]
        value = getattr(self, kind)
        if kind == "json" and not isinstance(value, str):
            value = self.with_schema_text().json
        elif kind == "choice":
            value = json.dumps(value)
        elif kind == "json_object":
            value = ""
        return json.dumps([kind, value, self.disable_any_whitespace])


class BadWordsIndex:
    """bad_words_token_ids arranged for a per-token check that costs the number of distinct
    sequence lengths, not the number of sequences: the last token of each sequence is banned
    where the output ends with the rest of it."""

    def __init__(self, seqs: list[list[int]]):
        self.always: list[int] = []  # one-token sequences
        self.by_context: dict[int, dict[tuple[int, ...], list[int]]] = {}  # context length -> context -> last
        for seq in seqs:
            if not seq:
                continue  # (refused by problems(); nothing to ban)
            if len(seq) == 1:
                self.always.append(seq[0])
            else:
                self.by_context.setdefault(len(seq) - 1, {}).setdefault(tuple(seq[:-1]), []).append(seq[-1])
        self.longest = max(self.by_context, default=0)

    def banned(self, output_tail: tuple[int, ...]) -> list[int]:
        """output_tail: the output's last `longest` tokens (fewer when it is shorter)."""
        out = list(self.always)
        for k, table in self.by_context.items():
            if k <= len(output_tail) and (last := table.get(output_tail[len(output_tail) - k:])) is not None:
                out.extend(last)
        return out


# dict=True: instances carry a __dict__ for cached derived state (BadWordsIndex), never encoded.
class SamplingParams(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, dict=True):
    n: int = 1  # completions per prompt; they share the prompt's cache blocks
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: Annotated[list[Annotated[str, _at_most(MAX_STOP_STRING_CHARS)]], _at_most(MAX_STOP_STRINGS)] = []
    stop_token_ids: Annotated[list[int], _at_most(MAX_TOKEN_LIST)] = []
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Constraints on which tokens can be sampled (the logprobs returned stay the model's own).
    logit_bias: Annotated[dict[int, float], _at_most(MAX_TOKEN_LIST)] = {}  # token id -> added to its logit
    allowed_token_ids: Annotated[list[int], _at_most(MAX_TOKEN_LIST)] | None = None  # only these can be sampled
    # never generated (the frontend tokenizes them into bad_words_token_ids)
    bad_words: Annotated[list[Annotated[str, _at_most(MAX_STOP_STRING_CHARS)]], _at_most(MAX_BAD_WORDS)] = []
    # token sequences never generated: the last token is
    # banned where the output ends with the rest (bad_words add two sequences each)
    bad_words_token_ids: Annotated[list[Annotated[list[int], _at_most(MAX_BAD_WORD_TOKENS)]],
                                   _at_most(2 * MAX_BAD_WORDS)] = []
    # Keep only the prompt's last k tokens (vLLM's left truncation); -1: as many as the context
    # holds with room for one generated token. Applied by the frontend (truncate_prompt).
    truncate_prompt_tokens: int | None = None
    # Output only what a grammar allows (a frontend compiles it: entrypoints/grammars.py).
    structured_outputs: StructuredOutputsParams | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @functools.cached_property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that edits the logits or reads them beyond their argmax (no
        logprobs): its token is the argmax of the model's logits, whatever its history."""
        return (self.temperature == 0.0 and self.logprobs is None and not self.logit_bias
                and self.allowed_token_ids is None and not self.bad_words_token_ids and self.min_tokens == 0
                and self.repetition_penalty == 1.0 and not self.frequency_penalty and not self.presence_penalty
                and self.structured_outputs is None)

    @functools.cached_property
    def bad_words_index(self) -> BadWordsIndex:
        return BadWordsIndex(self.bad_words_token_ids)

    def problems(self, vocab_size: int) -> list[str]:
        """What is wrong with these parameters, as sentences naming the field; empty if valid.
        Every frontend's requests pass here (the engine checks each one before it is queued), so a
        value that would misbehave downstream (NaN compares false to every bound, an integer past
        int64 cannot be encoded again) is refused here, by name, and nowhere else."""
        p: list[str] = []
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            v = getattr(self, name)
            if not math.isfinite(v):
                p.append(f"{name} must be a finite number, got {v}")
        if p:
            return p  # the range checks below assume finite values
        return self._range_problems() + self._list_problems(vocab_size)

    def _range_problems(self) -> list[str]:
        p: list[str] = []
        for name, lo, hi in (("n", 1, MAX_PARALLEL_SAMPLES), ("max_tokens", 1, MAX_TOKENS_LIMIT),
                             ("min_tokens", 0, min(self.max_tokens, MAX_TOKENS_LIMIT)),
                             ("top_k", -1, MAX_TOKENS_LIMIT)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                p.append(f"{name} must be in [{lo}, {hi}], got {v}")
        if self.seed is not None and not INT64[0] <= self.seed <= INT64[1]:
            p.append(f"seed must be a 64-bit signed integer, got {self.seed}")
        if self.temperature < 0:
            p.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            p.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            p.append(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            p.append(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            p.append(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not REPETITION_PENALTY_RANGE[0] <= self.repetition_penalty <= REPETITION_PENALTY_RANGE[1]:
            lo, hi = REPETITION_PENALTY_RANGE
            p.append(f"repetition_penalty must be in [{lo:g}, {hi:g}], got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= 20:
                p.append(f"{name} must be in [0, 20], got {n}")
        k = self.truncate_prompt_tokens
        if k is not None and k != -1 and not 1 <= k <= MAX_TOKENS_LIMIT:
            p.append(f"truncate_prompt_tokens must be -1 (the context) or at least 1, got {k}"
                     if k < 1 else f"truncate_prompt_tokens must be at most {MAX_TOKENS_LIMIT}, got {k}")
        return p

    def _list_problems(self, vocab_size: int) -> list[str]:
        p: list[str] = []
        if any(not s for s in self.stop):
            p.append("stop strings must not be empty")
        bad = [b for b in self.logit_bias.values() if not -100.0 <= b <= 100.0]  # (NaN fails too)
        if bad:
            p.append(f"logit_bias values must be in [-100, 100], got {bad[:5]}")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            p.append("allowed_token_ids must not be empty (leave it out to allow every token)")
        if any(not w for w in self.bad_words):
            p.append("bad_words must not be empty strings")
        if any(not seq for seq in self.bad_words_token_ids):
            p.append("bad_words_token_ids must not hold an empty sequence")
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias token ids", self.logit_bias),
                          ("allowed_token_ids", self.allowed_token_ids or []),
                          ("bad_words_token_ids", [t for seq in self.bad_words_token_ids for t in seq])):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                p.append(f"{name} {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        if self.structured_outputs is not None:
            p += self.structured_outputs.problems()
        return p


def completion_params(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters of completion `index` of a request with n > 1: one completion each, seeds
    seed + index (so completion 0 is what the same request with n = 1 gives), and the prompt's
    logprobs computed by completion 0 alone."""
    seed = None if params.seed is None else wrap_int64(params.seed + index)
    plp = params.prompt_logprobs if index == 0 else None
    return msgspec.structs.replace(params, n=1, seed=seed, prompt_logprobs=plp)


def wrap_int64(x: int) -> int:
    """x folded into int64 as two's complement does: a derived seed (seed + index) stays
    encodable and distinct from its neighbours."""
    return (x - INT64[0]) % (1 << 64) + INT64[0]


def truncate_prompt(ids: list[int], params: SamplingParams, max_model_len: int) -> list[int]:
    """The prompt as the engine runs it: its last truncate_prompt_tokens ids when that is set (an
    invalid value leaves it whole, for the engine to refuse with the field's name)."""
    k = params.truncate_prompt_tokens
    if k == -1:
        k = max_model_len - 1
    if k is None or k < 1 or len(ids) <= k:
        return ids
    return ids[-k:]


def tokenize_bad_words(params: SamplingParams, tokenizer) -> SamplingParams:
    """params with each of its bad_words added to bad_words_token_ids, as written and as a word
    after a space (the same word is another token sequence there), as vLLM does."""
    if not params.bad_words:
        return params
    texts = [t for word in params.bad_words for t in (word.lstrip(" "), " " + word.lstrip(" "))]
    seqs = [list(s) for s in params.bad_words_token_ids]
    seen = {tuple(s) for s in seqs}  # (a list's `in` made this quadratic in the number of words)
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        key = tuple(enc.ids)
        if key and key not in seen:
            seen.add(key)
            seqs.append(enc.ids)
    return msgspec.structs.replace(params, bad_words_token_ids=seqs)


def parse_sampling_params(raw: SamplingParams | dict | None) -> SamplingParams:
    """Accepts a SamplingParams, a dict of its fields, or None (defaults). Raises ValueError
    naming the offending field (unknown names, wrong types and overlong lists included). A
    SamplingParams made in Python is checked too (its constructor checks no types), through the
    same msgpack round trip that every process boundary applies."""
    if raw is None:
        return SamplingParams()
    try:
        if isinstance(raw, SamplingParams):
            return _params_decoder.decode(msgspec.msgpack.encode(raw))
        return msgspec.convert(raw, SamplingParams)
    except (msgspec.ValidationError, msgspec.EncodeError, TypeError, OverflowError, RecursionError) as e:
        raise ValueError(f"invalid sampling parameters: {e}") from None


_params_decoder = msgspec.msgpack.Decoder(SamplingParams)
