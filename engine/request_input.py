"""A request as a frontend receives it, made into what the engine runs: prompt ids and checked
sampling parameters. The offline API and the server both prepare requests here, so every
frontend refuses the same inputs with the same sentences (the engine checks them once more
before queuing: a frontend of someone else's may skip this)."""

from __future__ import annotations

from engine.sampling_params import (
    INT64,
    SamplingParams,
    parse_sampling_params,
    tokenize_bad_words,
    truncate_prompt,
)

# A prompt this many characters per context token cannot fit whatever the tokenizer does: it is
# refused before tokenizing (which is linear, but on a megabyte it is time others wait).
MAX_PROMPT_CHARS_PER_TOKEN = 64

# A prompt up to this size (characters, or token ids) is prepared on a frontend's loop: that
# takes tens of microseconds, and handing it to a thread and back costs a first token more
# (the GIL changes hands twice, after the loop's turn). Larger ones go to a thread pool.
INLINE_PROMPT_SIZE = 4096


def prepare_inline(prompt) -> bool:
    return prompt is None or len(prompt) <= INLINE_PROMPT_SIZE


class RequestInputError(ValueError):
    """The request's own input is wrong; the message names what. `params` is set when the
    parameters themselves were readable (so an n > 1 request can be refused per completion)."""

    def __init__(self, message: str, params: SamplingParams | None = None):
        super().__init__(message)
        self.params = params


def prompt_token_ids(prompt, tokenizer, max_model_len: int) -> list[int]:
    if isinstance(prompt, str):
        if len(prompt) > MAX_PROMPT_CHARS_PER_TOKEN * max_model_len:
            raise RequestInputError(f"prompt of {len(prompt)} characters is longer than the model's context "
                                    f"of {max_model_len} tokens")
        # encode_batch releases the interpreter while it runs (encode does not): a server that
        # prepares requests on threads keeps its loop running beside a long prompt.
        return tokenizer.encode_batch([prompt], add_special_tokens=False)[0].ids
    if not isinstance(prompt, (list, tuple)):
        raise RequestInputError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
    wrong = next((t for t in prompt if not isinstance(t, int) or isinstance(t, bool)), None)
    if wrong is not None:
        raise RequestInputError(f"a prompt is a string or a list of token ids, got a list holding "
                                f"{type(wrong).__name__} {wrong!r:.40}")
    return list(prompt)


def prompt_problem(ids: list[int], max_model_len: int, vocab_size: int) -> str | None:
    """What is wrong with prompt ids the engine would run, as a sentence; None if nothing."""
    if not ids:
        return "prompt is empty"
    if len(ids) >= max_model_len:
        return f"prompt has {len(ids)} tokens; the model's context is {max_model_len} tokens"
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        return f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})"
    return None


def check_priority(priority) -> int:
    if not isinstance(priority, int) or isinstance(priority, bool) or not INT64[0] <= priority <= INT64[1]:
        raise RequestInputError(f"priority must be a 64-bit signed integer, got {priority!r}")
    return priority


def prepare_request(prompt, raw_params, tokenizer, max_model_len: int,
                    vocab_size: int) -> tuple[list[int], SamplingParams]:
    """(prompt ids as the engine runs them, parameters with bad words tokenized), or
    RequestInputError. Parameters are checked before anything is tokenized, so a request that
    will be refused costs no tokenizing."""
    try:
        params = parse_sampling_params(raw_params)
    except ValueError as e:
        raise RequestInputError(str(e)) from None
    problems = params.problems(vocab_size)
    if problems:
        raise RequestInputError("; ".join(problems), params)
    if params.structured_outputs is not None:
        try:
            params.structured_outputs = params.structured_outputs.with_schema_text()
        except ValueError as e:
            raise RequestInputError(str(e), params) from None
    try:
        ids = truncate_prompt(prompt_token_ids(prompt, tokenizer, max_model_len), params, max_model_len)
    except RequestInputError as e:
        raise RequestInputError(str(e), params) from None
    if (problem := prompt_problem(ids, max_model_len, vocab_size)) is not None:
        raise RequestInputError(problem, params)
    return ids, tokenize_bad_words(params, tokenizer)
