"""The CPU attention paths (decode groups by block count, sliced gathers, expanded prefill chunks)
against attention written out per sequence from the MLA definition: keys and values expanded
per head from the latents, a causal softmax in float64."""

import random

import pytest
import torch

import kernels.mla_attention as attention
from kernels.backend import use_triton_kernels
from model.forward_batch import ForwardBatch, SequenceChunk

HEADS, NOPE, ROPE, RANK, V, PAGE = 4, 16, 8, 32, 16, 8


def per_sequence_reference(q_nope, q_pe, cache, tables, chunks, w_uk, w_uv, scale):
    flat = cache.double().view(-1, RANK + ROPE)
    outs = []
    for chunk, table in zip(chunks, tables):
        n, ctx = len(chunk.token_ids), chunk.num_computed + len(chunk.token_ids)
        slots = torch.tensor([table[p // PAGE] * PAGE + p % PAGE for p in range(ctx)])
        c, k_pe = flat[slots].split([RANK, ROPE], dim=-1)
        k_nope = torch.einsum("lc,hdc->hld", c, w_uk.double())
        v = torch.einsum("lc,hvc->hlv", c, w_uv.double())
        start = len(outs)
        q_n, q_p = q_nope[start: start + n].double(), q_pe[start: start + n].double()
        scores = (torch.einsum("thd,hld->htl", q_n, k_nope) + torch.einsum("thr,lr->htl", q_p, k_pe)) * scale
        pos = torch.arange(ctx - n, ctx)
        scores = scores.masked_fill(torch.arange(ctx)[None, None, :] > pos[None, :, None], float("-inf"))
        o = torch.einsum("htl,hlv->thv", scores.softmax(-1), v)
        outs.extend(o)
    return torch.stack(outs)


@pytest.mark.parametrize("slice_bytes", [1 << 40, 3000])
def test_cpu_attention_matches_the_definition(monkeypatch, slice_bytes):
    """Decodes of many lengths (several block-count groups, ragged last blocks), speculative
    verification rows (3 queries), and prefill chunks with and without a cached prefix, in one
    batch over shuffled blocks; with tiny slices every group's gather is split."""
    monkeypatch.setattr(attention, "GATHER_SLICE_BYTES", slice_bytes)
    rng = random.Random(0)
    torch.manual_seed(0)
    num_blocks = 400
    cache = torch.randn(num_blocks, PAGE, RANK + ROPE)
    free = list(range(num_blocks))
    rng.shuffle(free)
    shapes = [(rng.randint(1, 90), 1) for _ in range(30)] + [(rng.randint(5, 40), 3) for _ in range(4)]
    shapes += [(0, 20), (37, 12), (50, 9)]  # prefill chunks: from scratch, after a cached prefix
    chunks, tables = [], []
    for computed, n in shapes:
        blocks = [free.pop() for _ in range(-(-(computed + n) // PAGE))]
        tables.append(blocks)
        chunks.append(SequenceChunk([1] * n, computed, blocks))
    batch = ForwardBatch.build(chunks, PAGE)
    t = batch.query_start[-1]
    q_nope, q_pe = torch.randn(t, HEADS, NOPE), torch.randn(t, HEADS, ROPE)
    w_uk, w_uv = torch.randn(HEADS, NOPE, RANK) / 4, torch.randn(HEADS, V, RANK) / 4
    with use_triton_kernels(False):
        plan = attention.plan_attention(batch, cache, attention.GatherBuffer())
        assert len(plan.groups) > 3 and len(plan.prefills) == 3
        out = attention.mla_attention(q_nope, q_pe, cache, plan, w_uk, w_uv, 0.3)
    ref = per_sequence_reference(q_nope, q_pe, cache, tables, chunks, w_uk, w_uv, 0.3)
    assert out.shape == (t, HEADS, V)
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-4), (out.double() - ref).abs().max()


def test_groups_pad_little():
    """Below 8 blocks every count gets its own group; beyond, a group spans counts within 12.5%
    of its smallest."""
    chunks = [SequenceChunk([1], n * PAGE - 1, list(range(n))) for n in [1, 2, 2, 3, 8, 9, 10, 40, 44, 45, 50]]
    batch = ForwardBatch.build(chunks, PAGE)
    groups = attention._similar_lengths(batch, list(range(len(chunks))))
    counts = [sorted({-(-batch.context_lens[i] // PAGE) for i in g}) for g in groups]
    assert counts == [[1], [2], [3], [8, 9], [10], [40, 44, 45], [50]]
