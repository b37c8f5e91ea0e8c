"""Batched sampling: penalties, temperature, top-k / top-p / min-p, seeded draws, logprobs.

Randomness for a request's n-th output token comes from a generator seeded by (seed, n), so a
seeded request draws the same tokens whatever its batch, and again after a preemption.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from engine.messages import TokenLogprobs
from engine.sampling_params import SamplingParams


@dataclass
class SampleRow:
    """One token to sample. `token_ids` is the request's own list (prompt, then output), read and
    never copied unless a penalty needs the history, so a step's sampling does not cost more as
    sequences grow; `drafts` are the draft tokens verified before this row's position."""
    req_id: str
    params: SamplingParams
    token_ids: list[int]
    num_prompt: int
    drafts: list[int] = field(default_factory=list)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt + len(self.drafts)

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :] + self.drafts


def _row_seed(row: SampleRow, engine_seed: int) -> int:
    base = row.params.seed if row.params.seed is not None else (engine_seed << 32) ^ zlib.crc32(row.req_id.encode())
    return (base * 1_000_003 + row.num_output) & 0x7FFF_FFFF_FFFF_FFFF


def _apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and r.num_output:
            counts = torch.bincount(torch.tensor(r.output_ids), minlength=logits.shape[1]).float()
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def _mask_early_stops(logits: torch.Tensor, rows: list[SampleRow], eos: int | None) -> None:
    for i, r in enumerate(rows):
        if r.num_output < r.params.min_tokens:
            banned = list(r.params.stop_token_ids) + ([eos] if eos is not None else [])
            logits[i, banned] = float("-inf")


def _filter(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Temperature-scaled logits with top-k, top-p and min-p applied (-inf outside)."""
    temps = torch.tensor([r.params.temperature for r in rows]).clamp(min=1e-6)
    logits = logits / temps[:, None]
    top_k = [r.params.top_k for r in rows]
    top_p = torch.tensor([r.params.top_p for r in rows])
    min_p = torch.tensor([r.params.min_p for r in rows])
    if any(k > 0 for k in top_k) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[1])[None, :]
        k = torch.tensor([k if k > 0 else logits.shape[1] for k in top_k])
        drop = rank >= k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]  # keeps at least the top token
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def _logprob_entries(raw: torch.Tensor, tokens: torch.Tensor, rows: list[SampleRow]) -> list[list[TokenLogprobs]]:
    out: list[list[TokenLogprobs]] = []
    need = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not need:
        return [[] for _ in rows]
    lp = raw[need].log_softmax(-1)
    n_top = max(rows[i].params.logprobs or 0 for i in need)
    top_v, top_i = lp.topk(max(n_top, 1), dim=-1) if n_top else (None, None)
    by_row: dict[int, list[TokenLogprobs]] = {}
    for j, i in enumerate(need):
        tok = int(tokens[i])
        val = lp[j, tok]
        n = rows[i].params.logprobs or 0
        by_row[i] = [TokenLogprobs(
            token_id=tok, logprob=float(val), rank=int((lp[j] > val).sum()) + 1,
            top_ids=top_i[j, :n].tolist() if n else [], top_logprobs=top_v[j, :n].tolist() if n else [])]
    for i in range(len(rows)):
        out.append(by_row.get(i, []))
    return out


def draft_rows(row: SampleRow, drafts: list[int]) -> list[SampleRow]:
    """The rows that verify `drafts` for one request: row j samples the token after drafts[:j],
    so penalties, min_tokens and the seed see exactly the history they would without drafts."""
    return [SampleRow(row.req_id, row.params, row.token_ids, row.num_prompt, row.drafts + drafts[:j])
            for j in range(len(drafts) + 1)]


def sample(logits: torch.Tensor, rows: list[SampleRow], eos_token_id: int | None,
           engine_seed: int = 0) -> tuple[list[int], list[list[TokenLogprobs]]]:
    """logits [N, V] float32, one row per request due a token. Returns token ids and, per row,
    the logprobs entry when the request asked for logprobs (of the model's raw distribution)."""
    tokens, logprobs = speculative_sample(logits, rows, [-1] * len(rows), [1] * len(rows), eos_token_id,
                                          engine_seed)
    return [t[0] for t in tokens], logprobs


def speculative_sample(logits: torch.Tensor, rows: list[SampleRow], drafts: list[int], group_sizes: list[int],
                       eos_token_id: int | None, engine_seed: int = 0
                       ) -> tuple[list[list[int]], list[list[TokenLogprobs]]]:
    """Verifies drafts and samples, for groups of consecutive rows (one group per request, built
    by draft_rows): row i carries drafts[i], the draft proposed for the token it predicts (-1 on a
    group's last row). A group emits its drafts while they are accepted, then one sampled token.

    Greedy rows accept a draft equal to their argmax. Sampling rows use rejection sampling with a
    deterministic (one-hot) draft distribution: accept with probability p(draft), else draw from
    p with the draft removed, renormalized; that emits exactly p's distribution. Returns, per
    group, the emitted tokens and their logprobs entries (when asked for)."""
    raw = logits
    logits = logits.clone()
    _apply_penalties(logits, rows)
    _mask_early_stops(logits, rows, eos_token_id)
    choice = logits.argmax(-1)
    draft = torch.tensor(drafts, dtype=torch.long)
    has_draft = draft >= 0
    safe_draft = draft.clamp(min=0)[:, None]
    accept = has_draft & (choice == draft)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        idx = torch.tensor(random_rows)
        sub = [rows[i] for i in random_rows]
        probs = _filter(logits[idx], sub).softmax(-1)
        gens = [torch.Generator().manual_seed(_row_seed(r, engine_seed)) for r in sub]
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws exactly from p.
        noise = torch.stack([torch.empty(probs.shape[1]).exponential_(generator=g) for g in gens])
        uniform = torch.cat([torch.rand(1, generator=g) for g in gens])
        d = safe_draft[idx]
        accept[idx] = has_draft[idx] & (uniform < probs.gather(1, d)[:, 0])
        residual = torch.where(has_draft[idx][:, None], probs.scatter(1, d, 0.0), probs)
        choice[idx] = (residual / noise).argmax(-1)
    emitted_by_row = torch.where(accept, draft, choice)
    entries = _logprob_entries(raw, emitted_by_row, rows)
    acc, tok = accept.tolist(), emitted_by_row.tolist()
    tokens: list[list[int]] = []
    logprobs: list[list[TokenLogprobs]] = []
    start = 0
    for size in group_sizes:
        end = start
        while end < start + size - 1 and acc[end]:
            end += 1
        tokens.append(tok[start : end + 1])
        logprobs.append([e for i in range(start, end + 1) for e in entries[i]])
        start += size
    return tokens, logprobs


def prompt_logprob_entries(logits: torch.Tensor, next_tokens: list[int], n: int) -> list[TokenLogprobs]:
    """logits [L, V] at positions predicting next_tokens [L]."""
    lp = logits.log_softmax(-1)
    idx = torch.tensor(next_tokens)
    vals = lp[torch.arange(len(next_tokens)), idx]
    ranks = (lp > vals[:, None]).sum(-1) + 1
    top_v, top_i = lp.topk(max(n, 1), dim=-1)
    return [TokenLogprobs(token_id=t, logprob=float(v), rank=int(r),
                          top_ids=top_i[j, :n].tolist() if n else [], top_logprobs=top_v[j, :n].tolist() if n else [])
            for j, (t, v, r) in enumerate(zip(next_tokens, vals, ranks))]
