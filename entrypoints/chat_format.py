"""Chat messages to the prompt text the model was trained on, through transformers'
`apply_chat_template` as vLLM and SGLang render them: with `--chat-template FILE` when given, else
the checkpoint's `chat_template` (tokenizer_config.json), else the DeepSeek template our own
checkpoints carry (model/chat_template.jinja, docs/chat.md) with `thinking` off by default: the
V3 format, which leaves the answer's opening to the model. The messages are checked here first, so
a template sees only well-formed turns and a bad message is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.tokenizer_maker import chat_template

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 4096
MAX_TOOL_CALLS = 128


class ChatFormatError(ValueError):
    """A message list that cannot be rendered; the message names the offending message."""


def message_text(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatFormatError(f"{where}.content[{i}] must be a text part ({{'type': 'text', 'text': ...}})")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise ChatFormatError(f"{where}.content must be a string or a list of text parts")


class ChatFormatter:
    def __init__(self, model_dir: str | Path, template: str | None = None):
        """template: a Jinja chat template that replaces the checkpoint's (`--chat-template FILE`)."""
        from transformers import AutoTokenizer

        self._hf = AutoTokenizer.from_pretrained(str(model_dir))
        config = Path(model_dir) / "tokenizer_config.json"
        own = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
        self._template = template or own or chat_template()
        self._defaults = {} if template or own else {"thinking": False}

    def render(self, messages, tools: list | None = None, template_kwargs: dict | None = None) -> str:
        """`tools`: OpenAI function tools; `template_kwargs`: variables for the template (both
        checked by entrypoints/openai_requests.py)."""
        if not isinstance(messages, list) or not messages:
            raise ChatFormatError("messages must be a non-empty list")
        if len(messages) > MAX_MESSAGES:
            raise ChatFormatError(f"messages holds {len(messages)} messages; at most {MAX_MESSAGES}")
        turns = [_turn(m, f"messages[{i}]") for i, m in enumerate(messages)]
        variables = {**self._defaults, **(template_kwargs or {})}
        try:
            return self._hf.apply_chat_template(turns, tools=tools, chat_template=self._template, tokenize=False,
                                                add_generation_prompt=True, **variables)
        except Exception as e:  # the template's own error (raise_exception, a bad variable): this request's
            raise ChatFormatError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None


def _turn(m, where: str) -> dict:
    """One message, checked, as the template reads it."""
    if not isinstance(m, dict):
        raise ChatFormatError(f"{where} must be an object with a role and a content")
    role = m.get("role")
    if role not in ROLES:
        raise ChatFormatError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
    turn = {"role": role, "content": message_text(m.get("content"), where)}
    if role == "assistant" and m.get("tool_calls"):
        turn["tool_calls"] = _tool_calls(m["tool_calls"], where)
    if role == "tool" and m.get("tool_call_id") is not None:
        turn["tool_call_id"] = str(m["tool_call_id"])
    return turn


def _tool_calls(calls, where: str) -> list[dict]:
    """An assistant message's OpenAI tool calls, checked, in OpenAI's shape (templates read it)."""
    if not isinstance(calls, list) or len(calls) > MAX_TOOL_CALLS:
        raise ChatFormatError(f"{where}.tool_calls must be a list of at most {MAX_TOOL_CALLS} calls")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise ChatFormatError(f"{where}.tool_calls[{j}] must have a function with a name and arguments (strings)")
        out.append({"type": "function", "id": str(c.get("id", f"call_{j}")),
                    "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return out

