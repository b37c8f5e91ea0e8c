"""When a request stops: the rules the scheduler applies to every sampled token and the worker to
the drafts it proposes, written once. Plain functions of plain values: the scheduler calls them
for every running request every step."""

from __future__ import annotations

from engine.sampling_params import SamplingParams


def tokens_left(max_tokens: int, num_prompt_tokens: int, num_tokens: int, max_model_len: int) -> int:
    """Tokens a request of `num_tokens` (prompt and output) may still produce: by max_tokens or
    the context, whichever ends it first."""
    return min(max_tokens - (num_tokens - num_prompt_tokens), max_model_len - num_tokens)


def stop_reason(token: int, num_tokens: int, num_prompt_tokens: int, params: SamplingParams, eos: int,
                max_model_len: int) -> str | None:
    """Why a request whose last token (of `num_tokens` in all) is `token` ends, or None: "stop"
    for the end-of-sequence token (unless ignore_eos) or a stop token id, once min_tokens are
    out; "length" at max_tokens or the context's end."""
    n_out = num_tokens - num_prompt_tokens
    if n_out >= params.min_tokens and ((token == eos and not params.ignore_eos)
                                       or (params.stop_token_ids and token in params.stop_token_ids)):
        return "stop"
    if n_out >= params.max_tokens or num_tokens >= max_model_len:
        return "length"
    return None


def append_until_stop(out: list[int], token_ids: list[int], num_prompt_tokens: int, params: SamplingParams,
                      eos: int, max_model_len: int) -> tuple[list[int], str | None]:
    """Appends a step's tokens (one sampled, or accepted drafts then one) to `out`, the request's
    tokens, up to the first that stops it; returns those appended and the stop's reason or None."""
    if len(token_ids) == 1:  # the usual decode
        out.append(token_ids[0])
        return token_ids, stop_reason(token_ids[0], len(out), num_prompt_tokens, params, eos, max_model_len)
    end = len(out) + len(token_ids)
    if (end - num_prompt_tokens < params.max_tokens and end < max_model_len
            and (params.ignore_eos or eos not in token_ids)
            and not (params.stop_token_ids and any(t in params.stop_token_ids for t in token_ids))):
        out.extend(token_ids)  # accepted drafts, none of which stops it
        return token_ids, None
    for i, t in enumerate(token_ids):
        out.append(t)
        if reason := stop_reason(t, len(out), num_prompt_tokens, params, eos, max_model_len):
            return token_ids[: i + 1], reason  # a stop inside accepted drafts truncates there
    return token_ids, None
