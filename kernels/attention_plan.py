"""The step's attention plan: which sequences attend in the absorbed form (short queries, one row
per token for the kernels, or padded groups of similar lengths for the torch path) and how the
long prefill chunks are grouped to expand their contexts. Built once per step, shared by every
layer (kernels/mla_attention.py runs it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from kernels import native
from kernels.backend import triton_wanted
from kernels.forward_batch import ForwardBatch

# Sequences with at most this many query tokens share one padded computation.
SHORT_QUERY_MAX = 8


@dataclass
class AttentionGroup:
    token_index: torch.Tensor  # [B, Lq] flat token ids (padding points at a valid token)
    query_valid: torch.Tensor  # [B, Lq] bool
    block_index: torch.Tensor  # [B, n_blocks] physical blocks (padding points at block 0)
    mask: torch.Tensor  # [B, Lq, 1, n_blocks * block_size] 0 where the query may attend, -inf elsewhere


@dataclass
class DecodeRows:
    """The decode kernels' short-query tokens: one row per token, with its own causal length."""
    token_index: torch.Tensor | None  # [R] flat token ids; None when every token is a row
    seq_of_row: torch.Tensor  # [R] row of batch.block_tables
    kv_lens: torch.Tensor  # [R]
    max_kv_len: int


@dataclass
class PrefillChunk:
    start: int  # flat token range [start, end)
    end: int
    seq: int
    context_len: int


@dataclass
class PrefillGroup:
    """Prefill chunks whose contexts are expanded together."""
    chunks: list[PrefillChunk]
    slots: torch.Tensor  # cache rows to expand: the chunks' contexts one after another, or with `rows` each once
    spans: torch.Tensor  # [4, chunks]: query start, count, context start, length (in the contexts' rows)
    # When contexts share cache rows (chunks behind one cached prefix): row i of the contexts is
    # expanded row rows[i] (slots then holds each cache row once). None: slots are the contexts.
    rows: torch.Tensor | None = None


@dataclass
class AttentionPlan:
    """Built once per step and shared by every layer."""
    block_tables: torch.Tensor
    groups: list[AttentionGroup]  # short queries, torch path
    rows: DecodeRows | None  # short queries, Triton or compiled CPU kernel
    prefills: list[PrefillChunk]  # long queries, both paths
    buffer: GatherBuffer | None = None
    prefill_groups: list[PrefillGroup] = field(default_factory=list)


@dataclass
class OutputRows:
    """The rows of a step whose layer output is wanted (MTP drafting wants one a request; every
    row still writes its cache entries). `plan`, where given, attends those rows alone, each a
    one-token query at its position: a step with prompt chunks would otherwise expand every
    chunk's context for outputs that are dropped. None: every row attends, then the rows are taken."""
    index: torch.Tensor  # [R] rows of the batch, in the order wanted
    plan: AttentionPlan | None = None


def plan_output_rows(batch: ForwardBatch, index: list[int], seqs: list[int], positions: list[int],
                     like: torch.Tensor) -> OutputRows:
    """OutputRows for rows `index` of `batch`, row i at position positions[i] of batch's sequence
    seqs[i]. Attends them alone where the batch has long queries (prompt chunks); in a step of
    short queries attending every row costs less than planning again."""
    device = batch.block_tables.device
    rows = torch.tensor(index, dtype=torch.long, device=device)
    q_lens = (batch.query_start[i + 1] - batch.query_start[i] for i in range(batch.num_seqs))
    if not index or all(n <= SHORT_QUERY_MAX for n in q_lens):
        return OutputRows(rows)
    host = batch.host_block_tables if batch.host_block_tables is not None else batch.block_tables.cpu()
    which = torch.tensor(seqs, dtype=torch.long)
    tables = host[which]
    # Each wanted row as a sequence of its own: one query token with its own causal length.
    alone = ForwardBatch(rows, rows, rows, list(range(len(index) + 1)), [p + 1 for p in positions],
                         tables.to(device), batch.block_size, host_block_tables=tables)
    return OutputRows(rows, plan_attention(alone, like))


def plan_attention(batch: ForwardBatch, like: torch.Tensor, buffer: GatherBuffer | None = None,
                   expand_limit: int | None = None) -> AttentionPlan:
    """`like` is any tensor on the model's device: it picks the kernels or the reference.
    `expand_limit`: the most rows one prefill group expands (a longer context is a group of its
    own); None: all of the step's chunks in one group."""
    q_lens = [batch.query_start[i + 1] - batch.query_start[i] for i in range(batch.num_seqs)]
    short = [i for i, n in enumerate(q_lens) if n <= SHORT_QUERY_MAX]
    long = [i for i, n in enumerate(q_lens) if n > SHORT_QUERY_MAX]
    prefills = [PrefillChunk(batch.query_start[i], batch.query_start[i + 1], i, batch.context_lens[i]) for i in long]
    prefill_groups = [_prefill_group(batch, chunks) for chunks in _expansion_groups(batch, prefills, expand_limit)]
    # The compiled kernel reads host memory: the torch reference on a GPU tensor (tests comparing
    # against it on the GPU) takes the gathering path.
    if not triton_wanted(like) and (like.device.type != "cpu" or native.library("decode") is None):
        groups = [_group(batch, seqs, q_lens, like.dtype) for seqs in _similar_lengths(batch, short)]
        return AttentionPlan(batch.block_tables, groups, None, prefills, buffer, prefill_groups)
    rows = _decode_rows(batch, short, q_lens) if short else None
    return AttentionPlan(batch.block_tables, [], rows, prefills, buffer, prefill_groups)


class _GroupRows:
    """What a group of chunks expands: all their context rows, or (where contexts share cache
    blocks and the batch's tables are on the host) each shared row once plus one chunk's context
    at a time, whichever is fewer. Distinct rows are counted as whole distinct blocks: a bound,
    found from block ids, of the exact count _prefill_group takes."""

    def __init__(self, tables: torch.Tensor | None, page: int):
        self.tables, self.page = tables, page
        self.total = self.longest = 0
        self.blocks: set[int] = set()

    def blocks_of(self, p: PrefillChunk) -> set[int]:
        if self.tables is None:
            return set()
        return set(self.tables[p.seq, : -(-p.context_len // self.page)].tolist())

    def cost(self, p: PrefillChunk, blocks: set[int]) -> int:
        """Rows the group would expand with p (whose blocks are `blocks`) in it."""
        total = self.total + p.context_len
        if self.tables is None:
            return total
        return min(total, len(self.blocks | blocks) * self.page + max(self.longest, p.context_len))

    def add(self, p: PrefillChunk, blocks: set[int]) -> None:
        self.total += p.context_len
        self.longest = max(self.longest, p.context_len)
        self.blocks |= blocks


def _expansion_groups(batch: ForwardBatch, prefills: list[PrefillChunk],
                      limit: int | None) -> list[list[PrefillChunk]]:
    """Consecutive chunks, as many per group as keep what it expands within `limit` rows (one at least)."""
    if limit is None:
        return [prefills] if prefills else []
    groups: list[list[PrefillChunk]] = []
    held = _GroupRows(batch.host_block_tables, batch.block_size)
    for p in prefills:
        blocks = held.blocks_of(p)
        if not groups or held.cost(p, blocks) > limit:
            groups.append([])
            held = _GroupRows(batch.host_block_tables, batch.block_size)
        groups[-1].append(p)
        held.add(p, blocks)
    return groups


def _prefill_group(batch: ForwardBatch, chunks: list[PrefillChunk]) -> PrefillGroup:
    """The group's context rows: each distinct one once where that, plus a copy of the longest
    context, holds fewer rows than every context (chunks behind one cached prefix). The copies
    cost memory traffic only; every row not expanded saves 2 x rank flops per value."""
    lens = [p.context_len for p in chunks]
    spans = torch.tensor([[p.start for p in chunks], [p.end - p.start for p in chunks],
                          [0, *itertools.accumulate(lens[:-1])], lens])
    host = batch.host_block_tables
    slots = _context_slots(host if host is not None else batch.block_tables, batch.block_size, chunks)
    device = batch.block_tables.device
    if host is not None and len(chunks) > 1:
        unique, rows = torch.unique(slots, return_inverse=True)
        if unique.numel() + max(lens) < slots.numel():
            return PrefillGroup(chunks, unique.to(device), spans, rows.to(device))
    return PrefillGroup(chunks, slots.to(device), spans)


def _context_slots(tables: torch.Tensor, page: int, prefills: list[PrefillChunk]) -> torch.Tensor:
    """Flat cache rows (block * block_size + offset) of positions 0..context_len-1 of each chunk's
    sequence, the chunks one after another."""
    offsets = torch.arange(page, device=tables.device)
    parts = []
    for p in prefills:
        pages = -(-p.context_len // page)
        parts.append((tables[p.seq, :pages, None].long() * page + offsets).flatten()[: p.context_len])
    return torch.cat(parts)


# A group's shortest member is padded by at most this fraction of its blocks (beyond one block).
_GROUP_PADDING = 0.125


def _similar_lengths(batch: ForwardBatch, seqs: list[int]) -> list[list[int]]:
    """Sequences grouped by how many cache blocks they span: one group per block count while
    counts are small, ranges of counts within _GROUP_PADDING of each other beyond (a few dozen
    groups at most, whatever the context lengths)."""
    by_blocks: dict[int, list[int]] = {}
    for i in seqs:
        by_blocks.setdefault(-(-batch.context_lens[i] // batch.block_size), []).append(i)
    groups: list[list[int]] = []
    first = 0
    for n in sorted(by_blocks):
        if groups and n <= first * (1 + _GROUP_PADDING):
            groups[-1].extend(by_blocks[n])
        else:
            groups.append(list(by_blocks[n]))
            first = n
    return groups


def _decode_rows(batch: ForwardBatch, seqs: list[int], q_lens: list[int]) -> DecodeRows:
    device = batch.block_tables.device
    tokens, seq_of_row, kv_lens = [], [], []
    for i in seqs:
        start, ctx, n = batch.query_start[i], batch.context_lens[i], q_lens[i]
        tokens.extend(range(start, start + n))
        seq_of_row.extend([i] * n)
        kv_lens.extend(range(ctx - n + 1, ctx + 1))
    every_token = len(tokens) == batch.query_start[-1]
    index = None if every_token else torch.tensor(tokens, device=device)
    return DecodeRows(index, torch.tensor(seq_of_row, device=device, dtype=torch.int32),
                      torch.tensor(kv_lens, device=device, dtype=torch.int32), max(kv_lens))


def _group(batch: ForwardBatch, seqs: list[int], q_lens: list[int], dtype: torch.dtype) -> AttentionGroup:
    device = batch.block_tables.device
    bs = batch.block_size
    idx = torch.tensor(seqs, device=device)
    lq = torch.tensor([q_lens[i] for i in seqs], device=device)
    ctx = torch.tensor([batch.context_lens[i] for i in seqs], device=device)
    start = torch.tensor([batch.query_start[i] for i in seqs], device=device)
    max_q = int(lq.max())
    n_blocks = -(-int(ctx.max()) // bs)

    qi = torch.arange(max_q, device=device)
    query_valid = qi[None, :] < lq[:, None]
    token_index = torch.where(query_valid, start[:, None] + qi[None, :], start[:, None])

    # Whole blocks are gathered (one contiguous copy each), not token rows.
    block_index = batch.block_tables[idx][:, :n_blocks]
    kpos = torch.arange(n_blocks * bs, device=device)
    qpos = ctx[:, None] - lq[:, None] + qi[None, :]  # [B, Lq]
    allowed = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < ctx[:, None, None])
    # Additive, in the model's dtype, made once per step: a boolean mask would be converted by
    # the fused attention on every layer.
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    return AttentionGroup(token_index, query_valid, block_index, mask[:, :, None, :])


class GatherBuffer:
    """Reused memory for gathered cache blocks: a fresh allocation of this size page-faults on
    every layer, which costs more than the gather itself on the CPU."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = rows * cols
        if self._buf is None or self._buf.numel() < n or self._buf.dtype != dtype or self._buf.device != device:
            self._buf = torch.empty(n, dtype=dtype, device=device)
        return self._buf[:n].view(rows, cols)

    def release(self) -> None:
        self._buf = None
