"""Per-request sampling parameters, as a plain typed message (it crosses process boundaries)."""

from __future__ import annotations

import msgspec

MAX_PARALLEL_SAMPLES = 256  # n above this is refused: each completion is a sequence the engine tracks


class SamplingParams(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
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
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Constraints on which tokens can be sampled (the logprobs returned stay the model's own).
    logit_bias: dict[int, float] = {}  # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these can be sampled
    bad_words: list[str] = []  # never generated (the frontend tokenizes them into bad_words_token_ids)
    bad_words_token_ids: list[list[int]] = []  # token sequences never generated: the last token is
    # banned where the output ends with the rest
    # Keep only the prompt's last k tokens (vLLM's left truncation); -1: as many as the context
    # holds with room for one generated token. Applied by the frontend (truncate_prompt).
    truncate_prompt_tokens: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def problems(self, vocab_size: int) -> list[str]:
        """What is wrong with these parameters, as sentences naming the field; empty if valid."""
        p: list[str] = []
        if not 1 <= self.n <= MAX_PARALLEL_SAMPLES:
            p.append(f"n must be in [1, {MAX_PARALLEL_SAMPLES}], got {self.n}")
        if self.max_tokens < 1:
            p.append(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            p.append(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.temperature < 0:
            p.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            p.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            p.append(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            p.append(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            p.append(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            p.append(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            p.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= 20:
                p.append(f"{name} must be in [0, 20], got {n}")
        k = self.truncate_prompt_tokens
        if k is not None and k != -1 and k < 1:
            p.append(f"truncate_prompt_tokens must be -1 (the context) or at least 1, got {k}")
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
        return p


def completion_params(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters of completion `index` of a request with n > 1: one completion each, seeds
    seed + index (so completion 0 is what the same request with n = 1 gives), and the prompt's
    logprobs computed by completion 0 alone."""
    seed = None if params.seed is None else params.seed + index
    plp = params.prompt_logprobs if index == 0 else None
    return msgspec.structs.replace(params, n=1, seed=seed, prompt_logprobs=plp)


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
    seqs = [list(s) for s in params.bad_words_token_ids]
    for word in params.bad_words:
        for text in (word.lstrip(" "), " " + word.lstrip(" ")):
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            if ids and ids not in seqs:
                seqs.append(ids)
    return msgspec.structs.replace(params, bad_words_token_ids=seqs)


def parse_sampling_params(raw: SamplingParams | dict | None) -> SamplingParams:
    """Accepts a SamplingParams, a dict of its fields, or None (defaults). Raises ValueError
    naming the offending field (unknown names and wrong types included)."""
    if raw is None:
        return SamplingParams()
    if isinstance(raw, SamplingParams):
        return raw
    try:
        return msgspec.convert(raw, SamplingParams)
    except msgspec.ValidationError as e:
        raise ValueError(f"invalid sampling parameters: {e}") from None
