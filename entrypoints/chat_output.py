"""One chat choice's text as OpenAI's message fields, through the parsers the server runs with:
the reasoning span (`--reasoning-parser deepseek_r1`) as `reasoning_content` (and vLLM's newer
`reasoning`), the tool calls (`--tool-call-parser deepseek_v3`, when the request offered tools)
as `tool_calls`, the rest as `content`. A whole answer is the stream of one chunk, so a stream's
deltas add up to the whole answer's fields."""

from __future__ import annotations

from entrypoints.reasoning_parser import ReasoningStream, prompt_opens_reasoning
from entrypoints.tool_parser import ToolCall, ToolCallStream

REASONING_PARSERS = ("deepseek_r1",)
TOOL_CALL_PARSERS = ("deepseek_v3",)


class ChoiceOutput:
    def __init__(self, reasoning: bool, tools: bool, prompt: str | None = None):
        """prompt: the rendered prompt, which tells whether the output starts inside the reasoning span."""
        self.reasoning = ReasoningStream(thinking=prompt_opens_reasoning(prompt)) if reasoning else None
        self.tools = ToolCallStream() if tools else None
        self.reasoning_text = ""
        self.calls: list[ToolCall] = []

    def delta(self, text: str, last: bool) -> dict:
        """The delta fields `text` adds (`last`: the output ended with it)."""
        reasoning, content = "", text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(text)
            if last:
                more_reasoning, more_content = self.reasoning.finish()
                reasoning, content = reasoning + more_reasoning, content + more_content
        calls: list[ToolCall] = []
        if self.tools is not None:
            content, calls = self.tools.feed(content)
            if last:
                content += self.tools.finish()
        out: dict = {}
        if reasoning:
            self.reasoning_text += reasoning
            out["reasoning_content"] = out["reasoning"] = reasoning
        if content:
            out["content"] = content
        if calls:
            first = len(self.calls)
            self.calls += calls
            out["tool_calls"] = [c.openai(first + k) for k, c in enumerate(calls)]
        return out

    def message(self, text: str) -> dict:
        """A whole answer's message."""
        fields = self.delta(text, last=True)
        content = fields.get("content")
        if content is None:  # null with tool calls, or while the output never left the reasoning span
            content = None if self.calls or (self.reasoning is not None and self.reasoning.thinking) else ""
        msg = {"role": "assistant", "content": content}
        if self.reasoning is not None:
            msg["reasoning_content"] = msg["reasoning"] = self.reasoning_text
        if self.calls:
            msg["tool_calls"] = [c.openai() for c in self.calls]
        return msg

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.calls and reason == "stop" else reason
