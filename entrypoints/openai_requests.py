"""OpenAI request bodies to the engine's terms: prompts, SamplingParams fields, and what the
response shape needs (echo, logprobs, streaming). Everything the body says wrong is an
InvalidParameter naming the parameter; the sampling fields themselves are checked once, by
SamplingParams (engine/request_input.py), as for every frontend.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import SamplingParams

MAX_PROMPTS = 1024
MAX_TOP_LOGPROBS = 20
# OpenAI's names and vLLM's extras that are SamplingParams fields under the same name.
SAMPLING_FIELDS = {"n", "max_tokens", "min_tokens", "temperature", "top_k", "top_p", "min_p", "seed",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids",
                   "ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "bad_words",
                   "allowed_token_ids", "truncate_prompt_tokens", "prompt_logprobs"}
assert SAMPLING_FIELDS <= set(SamplingParams.__struct_fields__)
# Accepted and ignored: OpenAI fields with no meaning here.
IGNORED = {"model", "user", "suffix", "best_of", "parallel_tool_calls", "service_tier", "store", "metadata",
           "functions", "function_call", "modalities", "audio",
           "prediction", "reasoning_effort", "web_search_options"}


class InvalidParameter(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Parsed:
    prompts: list  # strings or token-id lists (completions); one rendered string (chat)
    params: dict  # SamplingParams fields
    stream: bool
    include_usage: bool
    logprobs: int | None  # top-n per token asked for (0: the sampled token's only)
    echo: bool
    priority: int
    tools: list | None = None  # chat: OpenAI's function tools, checked
    tool_choice: str = "auto"
    template_kwargs: dict | None = None  # chat: vLLM's chat_template_kwargs


def _check_type(body: dict, name: str, types: tuple, what: str) -> None:
    if name in body and body[name] is not None and (not isinstance(body[name], types)
                                                    or isinstance(body[name], bool) and bool not in types):
        raise InvalidParameter(f"{name} must be {what}, got {type(body[name]).__name__}", name)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    _check_type(body, name, (bool,), "a boolean")
    v = body.get(name)
    return default if v is None else v


def _sampling(body: dict, chat: bool) -> dict:
    params = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    if chat and body.get("max_completion_tokens") is not None:
        params["max_tokens"] = body["max_completion_tokens"]
    if "stop" in params and isinstance(params["stop"], str):
        params["stop"] = [params["stop"]]
    structured = _structured_outputs(body)
    if structured is not None:
        params["structured_outputs"] = structured
    if body.get("logit_bias") is not None:
        bias = body["logit_bias"]
        if not isinstance(bias, dict):
            raise InvalidParameter("logit_bias must be an object of token id -> bias", "logit_bias")
        try:
            params["logit_bias"] = {int(k): v for k, v in bias.items()}
        except (TypeError, ValueError):
            raise InvalidParameter("logit_bias keys must be token ids", "logit_bias") from None
    return params


def _structured_outputs(body: dict) -> dict | None:
    """OpenAI's response_format, or vLLM's structured_outputs (SamplingParams checks its fields)."""
    fmt, extra = body.get("response_format"), body.get("structured_outputs")
    if fmt is None or fmt == {"type": "text"}:
        return extra
    if extra is not None:  # options only (disable_any_whitespace), for response_format's constraint
        if not isinstance(extra, dict) or set(extra) & CONSTRAINT_KINDS:
            raise InvalidParameter("give the constraint in one of response_format and structured_outputs",
                                   "structured_outputs")
        return {**extra, **_response_format(fmt)}
    return _response_format(fmt)


CONSTRAINT_KINDS = {"json", "regex", "choice", "grammar", "json_object"}


def _response_format(fmt) -> dict | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InvalidParameter("response_format json_schema must be {'name': ..., 'schema': {...}}",
                                   "response_format")
        return {"json": spec["schema"]}
    raise InvalidParameter("response_format type must be 'text', 'json_object' or 'json_schema'", "response_format")


def _priority(body: dict) -> int:
    _check_type(body, "priority", (int,), "an integer")
    return body.get("priority") or 0


def _stream_options(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise InvalidParameter("stream_options must be an object", "stream_options")
    if not stream:
        raise InvalidParameter("stream_options is only allowed with stream: true", "stream_options")
    _check_type(opts, "include_usage", (bool,), "a boolean")
    return bool(opts.get("include_usage"))


def _unknown(body: dict, known: set) -> None:
    unknown = sorted(set(body) - known - IGNORED - SAMPLING_FIELDS)
    if unknown:
        raise InvalidParameter(f"unknown parameter {unknown[0]!r}", unknown[0])


def completion_request(body: dict) -> Parsed:
    _unknown(body, {"prompt", "stream", "stream_options", "logprobs", "echo", "logit_bias", "priority",
                    "response_format", "structured_outputs"})
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise InvalidParameter("prompt must be a string, a list of strings, a list of token ids or a list of "
                               "token-id lists", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidParameter(f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS}", "prompt")
    stream = _bool(body, "stream")
    _check_type(body, "logprobs", (int,), "an integer")
    logprobs = body.get("logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidParameter(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}", "logprobs")
    params = _sampling(body, chat=False)
    if logprobs is not None:
        params["logprobs"] = logprobs
    return Parsed(prompts, params, stream, _stream_options(body, stream), logprobs, _bool(body, "echo"),
                  _priority(body))


def chat_request(body: dict) -> tuple[list, Parsed]:
    """(the messages, to render; the rest parsed)."""
    _unknown(body, {"messages", "stream", "stream_options", "logprobs", "top_logprobs", "logit_bias", "priority",
                    "max_completion_tokens", "tools", "tool_choice", "chat_template_kwargs", "response_format",
                    "structured_outputs"})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter("messages must be a non-empty list of messages", "messages")
    stream = _bool(body, "stream")
    want = _bool(body, "logprobs")
    _check_type(body, "top_logprobs", (int,), "an integer")
    top = body.get("top_logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidParameter(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs")
    if top and not want:
        raise InvalidParameter("top_logprobs needs logprobs: true", "top_logprobs")
    params = _sampling(body, chat=True)
    logprobs = (top or 0) if want else None
    if logprobs is not None:
        params["logprobs"] = logprobs
    return messages, Parsed([], params, stream, _stream_options(body, stream), logprobs, False, _priority(body),
                            _tools(body), _tool_choice(body), _template_kwargs(body))


MAX_TEMPLATE_KWARGS = 32
# What the server itself passes to the template.
RESERVED_TEMPLATE_KWARGS = {"conversation", "messages", "tools", "chat_template", "tokenize",
                            "add_generation_prompt", "return_dict", "documents", "continue_final_message"}


def _template_kwargs(body: dict) -> dict | None:
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict) or len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise InvalidParameter(f"chat_template_kwargs must be an object of at most {MAX_TEMPLATE_KWARGS} variables",
                               "chat_template_kwargs")
    reserved = sorted(set(kwargs) & RESERVED_TEMPLATE_KWARGS)
    if reserved or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise InvalidParameter(f"chat_template_kwargs may not set {reserved or 'names that are not identifiers'}",
                               "chat_template_kwargs")
    return kwargs


MAX_TOOLS = 128


def _tools(body: dict) -> list | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise InvalidParameter(f"tools must be a list of at most {MAX_TOOLS} tools", "tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise InvalidParameter(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
        if not isinstance(fn.get("name"), str) or not fn["name"] or len(fn["name"]) > 256:
            raise InvalidParameter(f"tools[{i}].function.name must be a non-empty string of at most 256 characters",
                                   "tools")
        if not isinstance(fn.get("description", ""), str) or not isinstance(fn.get("parameters", {}), dict):
            raise InvalidParameter(f"tools[{i}].function: description must be a string and parameters an object",
                                   "tools")
    return tools


def _tool_choice(body: dict) -> str:
    choice = body.get("tool_choice")
    if choice is None:
        return "auto"
    if choice not in ("none", "auto"):
        raise InvalidParameter(f"tool_choice {choice!r} is not supported: use 'auto' or 'none'", "tool_choice")
    return choice


def param_of(message: str) -> str | None:
    """The field a SamplingParams refusal names ("temperature must be ...", "... at `$.stop`")."""
    if "`$." in message:
        return message.split("`$.", 1)[1].split("`", 1)[0].split("[", 1)[0].split(".", 1)[0]
    first = message.split(" ", 1)[0]
    return first if first in SAMPLING_FIELDS or first in ("logit_bias", "logprobs", "prompt") else None
