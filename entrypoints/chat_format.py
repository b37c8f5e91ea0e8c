"""Chat messages to the prompt text the model was trained on.

A checkpoint whose tokenizer_config.json carries a `chat_template` is rendered with it (through
transformers, as vLLM and SGLang do). Otherwise DeepSeek-V3's format: the begin-of-sentence token,
the system prompts, then each turn after its role tag, an assistant turn closed by the
end-of-sentence token, and the assistant tag that opens the answer:

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜><｜User｜>...<｜Assistant｜>
"""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 4096


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
    def __init__(self, model_dir: str | Path):
        config = Path(model_dir) / "tokenizer_config.json"
        template = None
        if config.exists():
            template = json.loads(config.read_text()).get("chat_template")
        self._hf = None
        if template:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(model_dir))

    def render(self, messages, tools: list | None = None) -> str:
        """`tools`: OpenAI function tools (checked by entrypoints/openai_requests.py)."""
        if not isinstance(messages, list) or not messages:
            raise ChatFormatError("messages must be a non-empty list")
        if len(messages) > MAX_MESSAGES:
            raise ChatFormatError(f"messages holds {len(messages)} messages; at most {MAX_MESSAGES}")
        turns = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise ChatFormatError(f"{where} must be an object with a role and a content")
            role = m.get("role")
            if role not in ROLES:
                raise ChatFormatError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
            turns.append({"role": role, "content": message_text(m.get("content"), where)})
        if self._hf is not None:
            return self._hf.apply_chat_template(turns, tools=tools, tokenize=False, add_generation_prompt=True)
        system = "".join(t["content"] for t in turns if t["role"] == "system") + tools_text(tools)
        out = [BOS, system]
        for t in turns:
            if t["role"] == "user":
                out += [USER, t["content"]]
            elif t["role"] == "assistant":
                out += [ASSISTANT, t["content"], EOS]
        out.append(ASSISTANT)
        return "".join(out)
