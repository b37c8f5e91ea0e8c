"""Chat messages to the prompt text the model was trained on.

A checkpoint whose tokenizer_config.json carries a `chat_template` is rendered with it (through
transformers, as vLLM and SGLang do). Otherwise DeepSeek-V3's format: the begin-of-sentence token,
the system prompts, then each turn after its role tag, an assistant turn closed by the
end-of-sentence token, and the assistant tag that opens the answer:

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜><｜User｜>...<｜Assistant｜>

An earlier answer's reasoning (up to `</think>`) is left out, as R1's template leaves it out. An
assistant turn's tool calls follow its content in DeepSeek-V3's call format (entrypoints/
tool_parser.py), and the outputs of `tool` messages that follow it come as one block:

    <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{output}<｜tool▁output▁end｜>...<｜tool▁outputs▁end｜>
"""

from __future__ import annotations

import json
from pathlib import Path

from entrypoints.reasoning_parser import THINK_END
from entrypoints.tool_parser import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
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


def tools_text(tools: list | None) -> str:
    """The tools as the plain format (no template) tells the model of them, after the system prompt:

        ## Tools
        ### NAME
        DESCRIPTION
        Parameters: {JSON schema}
        Call tools as: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME ...
    """
    if not tools:
        return ""
    lines = ["", "", "## Tools"]
    for t in tools:
        fn = t["function"]
        lines += [f"### {fn['name']}", fn.get("description", ""),
                  f"Parameters: {json.dumps(fn.get('parameters', {}), ensure_ascii=False)}"]
    lines.append("Call tools as: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n"
                 "ARGUMENTS\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
    return "\n".join(lines)


class ChatFormatter:
    def __init__(self, model_dir: str | Path, template: str | None = None):
        """template: a Jinja chat template that replaces the checkpoint's (`--chat-template FILE`)."""
        config = Path(model_dir) / "tokenizer_config.json"
        self._template = template
        if template is None and config.exists():
            template = json.loads(config.read_text()).get("chat_template")
        self._hf = None
        if template:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(model_dir))

    def render(self, messages, tools: list | None = None, template_kwargs: dict | None = None) -> str:
        """`tools`: OpenAI function tools; `template_kwargs`: variables for the template (both
        checked by entrypoints/openai_requests.py; the plain format has no variables)."""
        if not isinstance(messages, list) or not messages:
            raise ChatFormatError("messages must be a non-empty list")
        if len(messages) > MAX_MESSAGES:
            raise ChatFormatError(f"messages holds {len(messages)} messages; at most {MAX_MESSAGES}")
        turns = [_turn(m, f"messages[{i}]") for i, m in enumerate(messages)]
        if self._hf is not None:
            try:
                return self._hf.apply_chat_template(turns, tools=tools, chat_template=self._template, tokenize=False,
                                                    add_generation_prompt=True, **(template_kwargs or {}))
            except Exception as e:  # the template's own error (raise_exception, a bad variable): this request's
                raise ChatFormatError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
        return _plain_prompt(turns, tools)


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


def _plain_prompt(turns: list[dict], tools: list | None) -> str:
    """DeepSeek-V3's format, for a checkpoint without a chat template."""
    system = "".join(t["content"] for t in turns if t["role"] == "system") + tools_text(tools)
    out = [BOS, system]
    for i, t in enumerate(turns):
        role = t["role"]
        if role == "user":
            out += [USER, t["content"]]
        elif role == "assistant":
            out += [ASSISTANT, t["content"].split(THINK_END, 1)[-1]]
            if t.get("tool_calls"):
                out += [CALLS_BEGIN, *(_call_text(c["function"]) for c in t["tool_calls"]), CALLS_END]
            out.append(EOS)
        elif role == "tool":
            first = i == 0 or turns[i - 1]["role"] != "tool"
            last = i == len(turns) - 1 or turns[i + 1]["role"] != "tool"
            out += [OUTPUTS_BEGIN] * first + [OUTPUT_BEGIN, t["content"], OUTPUT_END] + [OUTPUTS_END] * last
    out.append(ASSISTANT)
    return "".join(out)


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


def _call_text(call: dict) -> str:
    return f"{CALL_BEGIN}function{SEP}{call['name']}\n```json\n{call['arguments']}\n```{CALL_END}"
