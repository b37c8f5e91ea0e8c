"""DeepSeek-R1's reasoning span (`--reasoning-parser deepseek_r1`, as vLLM's and SGLang's): the text
before `</think>` is the reasoning, the rest the answer. R1's chat template opens the span itself
(the prompt ends with `<think>\\n`), so the output may or may not repeat the opening tag; after
such a prompt, an output without `</think>` is all reasoning (it stopped while thinking). After a
prompt that did not open the span (`thinking` off), the output is the answer unless it opens one.

One incremental parser serves both whole answers and streams: a whole answer is the stream of one
chunk, so the concatenated stream deltas equal the whole answer's fields however the text was cut
(a tag split across chunks is held back until it is known)."""

from __future__ import annotations

from dataclasses import dataclass

from model.chat_tokens import THINK_END, THINK_START


def held_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag` (which the next
    chunk may complete)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@dataclass
class ReasoningStream:
    buffer: str = ""
    opened: bool = False  # whether the start was looked at for a repeated <think>
    thinking: bool = True

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that `text` adds."""
        self.buffer += text
        buf = self.buffer
        if not self.opened:
            if len(buf) < len(THINK_START) and THINK_START.startswith(buf):
                return "", ""
            if buf.startswith(THINK_START):
                buf, self.thinking = buf[len(THINK_START):], True
            self.opened = True
        reasoning = ""
        if self.thinking:
            end = buf.find(THINK_END)
            if end < 0:
                keep = held_prefix(buf, THINK_END)
                reasoning, self.buffer = buf[: len(buf) - keep], buf[len(buf) - keep:]
                return reasoning, ""
            reasoning, buf = buf[:end], buf[end + len(THINK_END):]
            self.thinking = False
        self.buffer = ""
        return reasoning, buf

    def finish(self) -> tuple[str, str]:
        """What was held back, once the output ended: a partial tag is text after all."""
        held, self.buffer, self.opened = self.buffer, "", True
        if self.thinking:
            return held, ""
        return "", held


def prompt_opens_reasoning(prompt: str | None) -> bool:
    """Whether the output starts inside the reasoning span: the prompt left a `<think>` open (R1's
    generation prompt), or the prompt is unknown. A prompt that closed the span or never opened
    it (`thinking` off, V3's format) starts in the answer, unless the output opens one itself."""
    if prompt is None:
        return True
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


def split_reasoning(text: str, thinking: bool = True) -> tuple[str, str | None]:
    """(reasoning, content) of a whole output; content None while it never left the span.
    thinking: whether it starts inside the span (prompt_opens_reasoning)."""
    stream = ReasoningStream(thinking=thinking)
    r1, c1 = stream.feed(text)
    r2, c2 = stream.finish()
    return r1 + r2, (None if stream.thinking else c1 + c2)
