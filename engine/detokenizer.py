"""Incremental detokenization with stop strings, per request, in the frontend."""

from __future__ import annotations

from tokenizers import Tokenizer

from engine.sampling_params import SamplingParams

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text grows only by complete characters: a byte-level token that ends inside a UTF-8
    sequence decodes to U+FFFD and is held back until the sequence completes."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.tok = tokenizer
        self.params = params
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # ids before this are fully reflected in self.text
        self._max_stop = max((len(s) for s in params.stop), default=0)

    def add(self, new_ids: list[int]) -> bool:
        """Appends tokens; returns True when a stop string ended the text."""
        self.ids.extend(new_ids)
        decoded = self.tok.decode(self.ids[self._prefix_offset :], skip_special_tokens=self.params.skip_special_tokens)
        if decoded.endswith(REPLACEMENT):
            return False
        old_len = len(self.text)
        self.text += decoded
        self._prefix_offset = len(self.ids)
        return self._apply_stop(old_len)

    def flush(self) -> None:
        """At the end, whatever is held back (an incomplete UTF-8 tail) is emitted as it decodes."""
        if self._prefix_offset < len(self.ids):
            tail = self.tok.decode(self.ids[self._prefix_offset :], skip_special_tokens=self.params.skip_special_tokens)
            self._prefix_offset = len(self.ids)
            old_len = len(self.text)
            self.text += tail
            self._apply_stop(old_len)

    def _apply_stop(self, old_len: int) -> bool:
        if not self.params.stop:
            return False
        start = max(0, old_len - self._max_stop + 1)
        hits = [(pos, s) for s in self.params.stop if (pos := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        pos, s = min(hits)
        self.text = self.text[: pos + (len(s) if self.params.include_stop_str_in_output else 0)]
        return True
