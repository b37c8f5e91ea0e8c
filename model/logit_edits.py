"""What the sampler does to the logits before it draws, written for the whole batch at once: the
penalties' token history kept on the device across steps, and the per-row edits (allowed tokens,
bad words, logit bias, min_tokens, penalties) applied as one indexed operation per kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.sampling_params import BadWordsIndex

if TYPE_CHECKING:
    from model.sampler import SampleRow


class TokenHistory:
    """What the penalties read, kept on the device across steps: per request, which tokens its
    prompt and output hold (repetition penalty) and how often each came in its output (frequency
    and presence), as a row of two [slots, vocab] tensors. Each step folds in only the tokens
    appended since the last, in one indexed update for the whole batch, so the cost follows what
    changed, not the length of the histories. The worker forgets a request when the scheduler
    drops it; a request seen again with another token list (readmitted) starts over."""

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu"):
        self.vocab_size = vocab_size
        self.seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self._entries: dict[str, list] = {}  # req id -> [slot, its token list, tokens folded in]
        self._free: list[int] = []

    def forget(self, req_ids: list[str]) -> None:
        for rid in req_ids:
            entry = self._entries.pop(rid, None)
            if entry is not None:
                self._free.append(entry[0])

    def __len__(self) -> int:
        return len(self._entries)

    def slots(self, rows: list[SampleRow]) -> list[int]:
        """Each row's slot, holding its request's accepted tokens (not its drafts) once this returns."""
        out: list[int] = []
        reset: list[int] = []
        seen_at: tuple[list[int], list[int]] = ([], [])
        count_at: tuple[list[int], list[int]] = ([], [])
        for r in rows:
            entry = self._entries.get(r.req_id)
            if entry is None or entry[1] is not r.token_ids or entry[2] > len(r.token_ids):
                if entry is None:
                    entry = self._entries[r.req_id] = [self._take_slot(), r.token_ids, 0]
                entry[1], entry[2] = r.token_ids, 0
                reset.append(entry[0])
            slot, tokens, folded = entry
            if folded < len(tokens):
                new = tokens[folded:]
                seen_at[0].extend([slot] * len(new))
                seen_at[1].extend(new)
                outputs = tokens[max(folded, r.num_prompt):]
                count_at[0].extend([slot] * len(outputs))
                count_at[1].extend(outputs)
                entry[2] = len(tokens)
            out.append(slot)
        if reset:
            at = on_device(reset, self.seen.device)
            self.seen[at] = False
            self.counts[at] = 0
        if seen_at[0]:
            self.seen[_index(seen_at, self.seen.device)] = True
        if count_at[0]:
            ones = torch.ones(len(count_at[0]), dtype=torch.int32, device=self.counts.device)
            self.counts.index_put_(_index(count_at, self.counts.device), ones, accumulate=True)
        return out

    def _take_slot(self) -> int:
        if not self._free:
            old = self.seen.shape[0]
            grown = max(8, 2 * old)
            self.seen = torch.cat([self.seen, self.seen.new_zeros(grown - old, self.vocab_size)])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grown - old, self.vocab_size)])
            self._free = list(range(grown - 1, old - 1, -1))
        return self._free.pop()


def on_device(values: list, device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small host list as a tensor on the device (the step's parameters, indices, edits)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _index(rows_tokens: tuple[list[int], list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    return on_device(rows_tokens[0], device), on_device(rows_tokens[1], device)


class LogitEdits:
    """Logit edits gathered over the rows as flat (row, token) lists, applied as one indexed
    operation per kind, in vLLM's order: allowed tokens, bad words, logit bias, min_tokens,
    then the penalties (dense over the penalized rows, from the TokenHistory)."""

    def __init__(self) -> None:
        self.allowed_rows: list[int] = []
        self.allowed_at: tuple[list[int], list[int]] = ([], [])  # (index into allowed_rows, token)
        self.banned: tuple[list[int], list[int]] = ([], [])
        self.bias: tuple[list[int], list[int], list[float]] = ([], [], [])
        self.penalized: list[int] = []  # rows with a penalty
        self.penalties: list[tuple[float, float, float]] = []  # (repetition, frequency, presence)
        self.draft_at: tuple[list[int], list[int]] = ([], [])  # (index into penalized, draft token)

    def add(self, i: int, r: SampleRow, eos: int | None) -> None:
        p = r.params
        if p.allowed_token_ids is not None:
            self.allowed_at[0].extend([len(self.allowed_rows)] * len(p.allowed_token_ids))
            self.allowed_at[1].extend(p.allowed_token_ids)
            self.allowed_rows.append(i)
        if p.bad_words_token_ids:
            self._ban(i, _banned_by_bad_words(p.bad_words_index, r.token_ids, r.num_prompt, r.drafts))
        if p.logit_bias:
            self.bias[0].extend([i] * len(p.logit_bias))
            self.bias[1].extend(p.logit_bias)
            self.bias[2].extend(p.logit_bias.values())
        if r.num_output < p.min_tokens:
            self._ban(i, list(p.stop_token_ids) + ([eos] if eos is not None else []))
        if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            self.draft_at[0].extend([len(self.penalized)] * len(r.drafts))
            self.draft_at[1].extend(r.drafts)
            self.penalized.append(i)
            self.penalties.append((p.repetition_penalty, p.frequency_penalty, p.presence_penalty))

    def _ban(self, i: int, tokens: list[int]) -> None:
        self.banned[0].extend([i] * len(tokens))
        self.banned[1].extend(tokens)

    def any(self) -> bool:
        return bool(self.allowed_rows or self.banned[0] or self.bias[0] or self.penalized)

    def apply(self, logits: torch.Tensor, rows: list[SampleRow], history: TokenHistory | None) -> None:
        dev, dtype = logits.device, logits.dtype
        if self.allowed_rows:
            at = on_device(self.allowed_rows, dev)
            keep = torch.zeros(len(self.allowed_rows), logits.shape[1], dtype=torch.bool, device=dev)
            keep[_index(self.allowed_at, dev)] = True
            logits[at] = logits[at].masked_fill_(~keep, float("-inf"))
        if self.banned[0]:
            logits[_index(self.banned, dev)] = float("-inf")
        if self.bias[0]:
            bias = on_device(self.bias[2], dev, dtype)
            logits.index_put_(_index(self.bias[:2], dev), bias, accumulate=True)
        if self.penalized:
            if history is None:  # a one-off call (tests, tools): a history for these rows alone
                history = TokenHistory(logits.shape[1], dev)
            slots = on_device(history.slots([rows[i] for i in self.penalized]), dev)
            seen = history.seen[slots]
            counts = history.counts[slots].to(dtype)
            if self.draft_at[0]:  # the drafts before a verification row count as its output
                at = _index(self.draft_at, dev)
                seen[at] = True
                counts.index_put_(at, torch.ones(len(self.draft_at[0]), dtype=counts.dtype, device=dev),
                                  accumulate=True)
            at = on_device(self.penalized, dev)
            vals = logits[at]
            rep, freq, pres = zip(*self.penalties)
            if any(x != 1.0 for x in rep):
                rep_t = on_device(rep, dev, dtype)[:, None]
                vals.mul_(torch.where(seen, torch.where(vals > 0, 1 / rep_t, rep_t), 1.0))
            if any(freq):
                vals.sub_(counts * on_device(freq, dev, dtype)[:, None])
            if any(pres):
                vals.sub_((counts > 0) * on_device(pres, dev, dtype)[:, None])
            logits[at] = vals


def _banned_by_bad_words(index: BadWordsIndex, token_ids: list[int], num_prompt: int,
                         drafts: list[int]) -> list[int]:
    """The last token of each sequence whose other tokens end the output (never the prompt)."""
    num_output = len(token_ids) - num_prompt + len(drafts)
    k = min(index.longest, num_output)
    # The output's last k tokens, drafts last, without copying the whole history.
    from_drafts = drafts[-k:] if k else []
    need = k - len(from_drafts)
    tail = (token_ids[len(token_ids) - need:] if need else []) + from_drafts
    return index.banned(tuple(tail))
