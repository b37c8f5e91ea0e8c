"""DeepSeek-V3's tool calls (`--tool-call-parser deepseek_v3`, as vLLM's and SGLang's), from the
text the model writes after its answer's content:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {ARGUMENTS}
    ```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

Each well-formed call (a name, arguments that parse as a JSON object) becomes an OpenAI tool call;
anything else, a malformed or unterminated call included, stays content: nothing the model wrote
is dropped. As with the reasoning parser, one incremental parser serves whole answers and
streams, so both give the same calls and content however the text was cut."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from entrypoints.reasoning_parser import held_prefix
from model.chat_tokens import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP

_CALL = re.compile(r"(?P<type>[^\n]*?)" + re.escape(SEP) + r"(?P<name>[^\n]+)\n```(?:json)?\n(?P<args>.*)\n```\s*\Z",
                   re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as the model wrote it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def parse_call(body: str) -> ToolCall | None:
    """The text between a call's begin and end tokens, or None when it is not a well-formed call."""
    m = _CALL.match(body)
    if m is None or m["type"].strip() not in ("function", ""):
        return None
    args = m["args"].strip()
    try:
        if not isinstance(json.loads(args), dict):
            return None
    except (ValueError, RecursionError):
        return None
    return ToolCall(m["name"].strip(), args)


@dataclass
class ToolCallStream:
    buffer: str = ""
    in_calls: bool = False
    done: bool = False  # the section ended: the rest is content
    calls: list[ToolCall] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls completed) that `text` adds."""
        self.buffer += text
        content, new = [], []
        while True:
            buf = self.buffer
            if self.done:
                content.append(buf)
                self.buffer = ""
                break
            if not self.in_calls:
                start = buf.find(CALLS_BEGIN)
                if start < 0:
                    keep = held_prefix(buf, CALLS_BEGIN)
                    content.append(buf[: len(buf) - keep])
                    self.buffer = buf[len(buf) - keep:]
                    break
                content.append(buf[:start])
                self.buffer, self.in_calls = buf[start + len(CALLS_BEGIN):], True
                continue
            rest = buf.lstrip()
            if rest.startswith(CALLS_END):
                self.buffer, self.done = rest[len(CALLS_END):], True
                continue
            if rest.startswith(CALL_BEGIN):
                end = rest.find(CALL_END)
                if end < 0:
                    break  # the call is still being written
                call = parse_call(rest[len(CALL_BEGIN):end])
                if call is None:
                    content.append(rest[: end + len(CALL_END)])
                else:
                    new.append(call)
                self.buffer = rest[end + len(CALL_END):]
                continue
            if not rest or CALL_BEGIN.startswith(rest) or CALLS_END.startswith(rest):
                break  # a token not yet complete
            # Neither a call nor the section's end: text, its opening token too if no call came.
            self.buffer, self.done = (CALLS_BEGIN if not (self.calls or new) else "") + buf, True
        self.calls += new
        return "".join(content), new

    def finish(self) -> str:
        """What was held back, once the output ended: an unterminated section is content (with
        its opening token when no call came before it)."""
        held, self.buffer = self.buffer, ""
        if self.in_calls and not self.done and not self.calls:
            held = CALLS_BEGIN + held
        self.done = True
        return held


def split_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    stream = ToolCallStream()
    c1, calls = stream.feed(text)
    c2 = stream.finish()
    return c1 + c2, calls
