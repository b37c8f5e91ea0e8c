"""Batched sampling: constraints, penalties, temperature, top-k / top-p / min-p, seeded draws,
speculative verification, logprobs.

Everything runs where the logits are (the GPU, on a GPU), as whole-batch tensor operations: the
per-row work done in Python is reading each row's parameters and the token ids its edits touch,
and one transfer brings back the chosen tokens (a batch with top-k or top-p waits once more, to
learn which rows need a whole sort). A row's draw takes two uniforms: one decides
whether its draft is accepted, the other picks a token by inverse CDF. They come from a
counter-based generator keyed by (seed, number of output tokens so far), so a seeded request
draws the same tokens whatever its batch, after a preemption, and on any device.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from engine.messages import TokenLogprobs
from engine.sampling_params import SamplingParams
from model.grammar_mask import apply_bitmask
from model.logit_edits import LogitEdits, TokenHistory, on_device

_MASK64 = (1 << 64) - 1


@dataclass
class SampleRow:
    """One token to sample. `token_ids` is the request's own list (prompt, then output), read and
    never copied (the penalties' TokenHistory takes only what was appended since the last step),
    so a step's sampling does not cost more as sequences grow; `drafts` are the draft tokens
    verified before this row's position."""
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


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_uniforms(seed: int) -> tuple[float, float]:
    """Two uniforms from a row's seed, 24 bits each: the first in [0, 1), the second in
    [0, 1 - 2^-22) so that a float32 inverse-CDF target never reaches the top of the CDF."""
    x = _splitmix64(seed)
    return (x >> 40) * 2.0**-24, ((x >> 16) & 0xFFFFFF) * 2.0**-24 * (1 - 2.0**-22)


# Top-p looks at each row's _HEAD largest logits first (a partial selection, ~15x cheaper than
# sorting DeepSeek-V3's 129280 entries on a CPU): a row is settled there when its nucleus ends
# inside the head, as it does for the peaked distributions a language model mostly gives; only
# the other rows (a flat distribution, or a top_k too large to select) sort their whole row.
_HEAD = 1024
_LARGEST_SELECTED_TOP_K = 4096


def _filter(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Temperature-scaled logits with top-k, top-p and min-p applied (-inf outside)."""
    dev = logits.device
    vocab = logits.shape[1]
    temps = [max(r.params.temperature, 1e-6) for r in rows]
    logits = logits / on_device(temps, dev, torch.float32)[:, None]
    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    top_p = [r.params.top_p for r in rows]
    filtered = [i for i, (k, p) in enumerate(zip(top_k, top_p)) if k < vocab or p < 1.0]
    if filtered:  # only those rows pay for the selection
        every = len(filtered) == len(rows)
        at = None if every else on_device(filtered, dev)
        sub = logits if every else logits[at]
        cutoffs = _top_k_top_p_cutoffs(sub, [top_k[i] for i in filtered], [top_p[i] for i in filtered])
        sub = sub.masked_fill(sub < cutoffs[:, None], float("-inf"))
        logits = sub if every else logits.index_copy(0, at, sub)
    min_p = [r.params.min_p for r in rows]
    if max(min_p) > 0:  # p < min_p * p_max, without the softmax (log 0 = -inf drops nothing)
        floor = logits.amax(-1) + on_device(min_p, dev, torch.float32).log()
        logits = logits.masked_fill(logits < floor[:, None], float("-inf"))
    return logits


def _top_k_top_p_cutoffs(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Each row's least kept logit under top-k, then top-p over the top-k tokens' renormalized
    distribution (the most likely token is always kept; tokens tied with the cutoff stay too).
    -inf for rows with neither. top_k: `vocab` where unset."""
    dev = logits.device
    vocab = logits.shape[1]
    selectable = [k for k in top_k if k <= _LARGEST_SELECTED_TOP_K]
    size = min(vocab, max(selectable + [_HEAD if min(top_p) < 1.0 else 1]))
    ks, ps = on_device(top_k, dev), on_device(top_p, dev, torch.float32)
    head = logits.topk(size, dim=-1).values
    whole_row_norm = None
    if size < vocab and any(k == vocab and p < 1.0 for k, p in zip(top_k, top_p)):
        whole_row_norm = logits.logsumexp(-1)
    cutoffs, settled = _cutoffs_in(head, ks, ps, vocab, whole_row_norm)
    if size < vocab:
        unsettled = (~settled).nonzero()[:, 0]
        if unsettled.numel():  # (a wait on the device, only for batches with top-k or top-p)
            whole = logits[unsettled].sort(dim=-1, descending=True).values
            cutoffs[unsettled] = _cutoffs_in(whole, ks[unsettled], ps[unsettled], vocab, None)[0]
    return cutoffs


def _cutoffs_in(desc: torch.Tensor, ks: torch.Tensor, ps: torch.Tensor, vocab: int,
                whole_row_norm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """desc: each row's largest logits, descending (a head, or the whole row). The cutoffs, and
    which rows the head settles on its own: those whose top-k tokens all lie in it, and those
    without top-k whose top-p mass ends inside it. whole_row_norm: the rows' logsumexp, for rows
    without top-k when desc is only a head."""
    rank = torch.arange(desc.shape[1], device=desc.device)
    in_top_k = rank[None, :] < ks[:, None]
    norm = desc.masked_fill(~in_top_k, float("-inf")).logsumexp(-1)
    if whole_row_norm is not None:
        norm = torch.where(ks == vocab, whole_row_norm, norm)
    p = (desc - norm[:, None]).exp().masked_fill(~in_top_k, 0.0)
    cum = p.cumsum(-1)
    kept = in_top_k & (cum - p < ps[:, None])
    cutoffs = desc.gather(1, (kept.sum(-1, keepdim=True) - 1).clamp(min=0))[:, 0]
    unfiltered = (ks == vocab) & (ps >= 1.0)
    settled = unfiltered | (ks <= desc.shape[1]) | ((ks == vocab) & (cum[:, -1] >= ps))
    return cutoffs.masked_fill(unfiltered, float("-inf")), settled


def _logprob_entries(raw: torch.Tensor, tokens: torch.Tensor, rows: list[SampleRow]) -> list[list[TokenLogprobs]]:
    need = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not need:
        return [[] for _ in rows]
    at = on_device(need, raw.device)
    lp = raw[at].log_softmax(-1)
    chosen = tokens[at]
    vals = lp.gather(1, chosen[:, None])
    ranks = (lp > vals).sum(-1) + 1
    n_top = max(rows[i].params.logprobs or 0 for i in need)
    top_v, top_i = lp.topk(max(n_top, 1), dim=-1)
    chosen_l, vals_l, ranks_l = chosen.tolist(), vals[:, 0].tolist(), ranks.tolist()
    top_v_l, top_i_l = top_v.tolist(), top_i.tolist()
    by_row: dict[int, list[TokenLogprobs]] = {}
    for j, i in enumerate(need):
        n = rows[i].params.logprobs or 0
        by_row[i] = [TokenLogprobs(token_id=chosen_l[j], logprob=vals_l[j], rank=ranks_l[j],
                                   top_ids=top_i_l[j][:n], top_logprobs=top_v_l[j][:n])]
    return [by_row.get(i, []) for i in range(len(rows))]


def draft_rows(row: SampleRow, drafts: list[int]) -> list[SampleRow]:
    """The rows that verify `drafts` for one request: row j samples the token after drafts[:j],
    so penalties, min_tokens and the seed see exactly the history they would without drafts."""
    return [SampleRow(row.req_id, row.params, row.token_ids, row.num_prompt, row.drafts + drafts[:j])
            for j in range(len(drafts) + 1)]


def sample(logits: torch.Tensor, rows: list[SampleRow], eos_token_id: int | None,
           engine_seed: int = 0, history: TokenHistory | None = None) -> tuple[list[int], list[list[TokenLogprobs]]]:
    """logits [N, V] float32, one row per request due a token. Returns token ids and, per row,
    the logprobs entry when the request asked for logprobs (of the model's raw distribution)."""
    tokens, logprobs = speculative_sample(logits, rows, [-1] * len(rows), [1] * len(rows), eos_token_id,
                                          engine_seed, history)
    return [t[0] for t in tokens], logprobs


def _draw(probs: torch.Tensor, drafts: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling against a deterministic (one-hot) draft, by inverse CDF. probs [R, V]
    (overwritten); drafts [R] (-1: none); uniforms [R, 2], the second below 1 - 2^-22. Accepts
    the draft d with probability p(d); otherwise draws from p with d removed, renormalized:
    together that emits exactly p's distribution. Returns (accepted [R] bool, the drawn token [R])."""
    has_draft = drafts >= 0
    d = drafts.clamp(min=0)[:, None]
    p_draft = probs.gather(1, d)
    accepted = has_draft & (uniforms[:, 0] < p_draft[:, 0])
    probs.scatter_(1, d, torch.where(has_draft[:, None], 0.0, p_draft))  # the residual
    cdf = probs.cumsum_(-1)
    # The target stays below the CDF's top even after float32 rounding (the uniform's margin), so
    # the first entry above it is a token with mass.
    drawn = torch.searchsorted(cdf, uniforms[:, 1:] * cdf[:, -1:], right=True)[:, 0]
    return accepted, drawn


def speculative_sample(logits: torch.Tensor, rows: list[SampleRow], drafts: list[int], group_sizes: list[int],
                       eos_token_id: int | None, engine_seed: int = 0, history: TokenHistory | None = None,
                       grammar: tuple[list[int], torch.Tensor] | None = None
                       ) -> tuple[list[list[int]], list[list[TokenLogprobs]]]:
    """Verifies drafts and samples, for groups of consecutive rows (one group per request, built
    by draft_rows): row i carries drafts[i], the draft proposed for the token it predicts (-1 on a
    group's last row). A group emits its drafts while they are accepted, then one sampled token.

    Greedy rows accept a draft equal to their argmax; sampling rows use rejection sampling (_draw).
    `history` keeps the penalties' token counts across calls (a worker's; without one they are
    counted afresh). `grammar`: structured outputs' rows and token bitmask (model/grammar_mask.py).
    Returns, per group, the emitted tokens and their logprobs entries (when asked for)."""
    assert logits.shape[0] == len(rows) == len(drafts) == sum(group_sizes), "one logits row per sampled row"
    dev = logits.device
    raw = logits
    logits = _edited(logits, rows, eos_token_id, history, grammar)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    draft = on_device(drafts, dev)
    everyone = bool(random_rows) and len(random_rows) == len(rows)
    if not everyone:  # greedy rows take their argmax
        choice = logits.argmax(-1)
        accept = (draft >= 0) & (choice == draft)
    if random_rows:  # the others draw (without gathering their rows when that is every row)
        sub = rows if everyone else [rows[i] for i in random_rows]
        uniforms = on_device([row_uniforms(_row_seed(r, engine_seed)) for r in sub], dev, torch.float32)
        if everyone:
            accept, choice = _draw(_filter(logits, rows).softmax(-1), draft, uniforms)
        else:
            idx = on_device(random_rows, dev)
            accept[idx], choice[idx] = _draw(_filter(logits[idx], sub).softmax(-1), draft[idx], uniforms)
    emitted_by_row = torch.where(accept, draft, choice)
    entries = _logprob_entries(raw, emitted_by_row, rows)
    if len(group_sizes) == len(rows):  # no drafts: one row, one token per request
        return [[t] for t in emitted_by_row.tolist()], entries  # (the step's one wait on the device)
    acc, tok = torch.stack([accept.long(), emitted_by_row]).tolist()  # the step's one wait on the device
    return _emitted_by_group(acc, tok, entries, group_sizes)


def greedy_verify(logits: torch.Tensor, drafts: list[int], group_sizes: list[int]) -> list[list[int]]:
    """speculative_sample for rows whose parameters are all plain greedy (SamplingParams.plain_greedy):
    each row's token is its argmax, a draft is accepted where it equals it, and a group emits its
    accepted drafts and then the first argmax that differs. No per-row parameters are read, so
    nothing is built per row: the argmaxes come back in one transfer."""
    choice = logits.argmax(-1).tolist()  # (the step's one wait on the device)
    if len(group_sizes) == len(choice):
        return [[t] for t in choice]
    accepted = [c == d for c, d in zip(choice, drafts)]
    return _emitted_by_group(accepted, choice, [[]] * len(choice), group_sizes)[0]


def _edited(logits: torch.Tensor, rows: list[SampleRow], eos_token_id: int | None,
            history: TokenHistory | None, grammar: tuple[list[int], torch.Tensor] | None = None) -> torch.Tensor:
    """The logits with every row's edits applied (a copy; the logits themselves when none has any).
    A grammar's mask comes first and stays: the other edits fall back to it."""
    if grammar is not None:
        logits = logits.clone()
        apply_bitmask(logits, *grammar)
    edits = LogitEdits()
    for i, r in enumerate(rows):
        edits.add(i, r, eos_token_id)
    if not edits.any():
        return logits
    edited = logits.clone()
    edits.apply(edited, rows, history)
    # A row whose edits leave no token at all (every allowed token banned, say: constraints that
    # contradict each other), or a logit at +inf or NaN (whose softmax is NaN everywhere), samples
    # as if it had no edits (but its grammar's), rather than emit a token out of the vocabulary.
    # (No test of whether any row is: that would wait on the device.)
    return torch.where(torch.isfinite(edited.amax(-1, keepdim=True)), edited, logits)


def _emitted_by_group(acc: list[int], tok: list[int], entries: list[list[TokenLogprobs]], group_sizes: list[int]
                      ) -> tuple[list[list[int]], list[list[TokenLogprobs]]]:
    """Each group's accepted drafts and then its one sampled token, with their logprobs entries."""
    tokens: list[list[int]] = []
    logprobs: list[list[TokenLogprobs]] = []
    start = 0
    for size in group_sizes:
        end = start
        while end < start + size - 1 and acc[end]:
            end += 1
        tokens.append(tok[start : end + 1])
        logprobs.append(entries[start] if end == start else [e for i in range(start, end + 1) for e in entries[i]])
        start += size
    return tokens, logprobs


def prompt_logprob_entries(logits: torch.Tensor, next_tokens: list[int], n: int) -> list[TokenLogprobs]:
    """logits [L, V] at positions predicting next_tokens [L]."""
    lp = logits.log_softmax(-1)
    idx = on_device(next_tokens, lp.device)
    vals = lp[torch.arange(len(next_tokens), device=lp.device), idx]
    ranks = (lp > vals[:, None]).sum(-1) + 1
    top_v, top_i = lp.topk(max(n, 1), dim=-1)
    top_v_l, top_i_l = top_v.tolist(), top_i.tolist()
    return [TokenLogprobs(token_id=t, logprob=v, rank=r, top_ids=top_i_l[j][:n] if n else [],
                          top_logprobs=top_v_l[j][:n] if n else [])
            for j, (t, v, r) in enumerate(zip(next_tokens, vals.tolist(), ranks.tolist()))]
