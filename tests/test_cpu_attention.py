"""The CPU attention paths (the compiled decode kernel; without it, decode groups by block count
and sliced gathers; expanded prefill chunks) against attention written out per sequence from the
MLA definition: keys and values expanded per head from the latents, a causal softmax in float64."""

import random

import pytest
import torch

import kernels.attention_plan as attention_plan
import kernels.mla_attention as attention
from kernels import cpu_build, latent_fp8, native
from kernels.backend import use_triton_kernels
from kernels.forward_batch import ForwardBatch, SequenceChunk
from kernels.mla_decode import paged_mla_decode_ref
from tests.cpu_variants import compiled_kernels, each_variant, use_variant, why_not_runnable

HEADS, NOPE, ROPE, RANK, V, PAGE = 4, 16, 8, 32, 16, 8


def per_sequence_reference(q_nope, q_pe, cache, tables, chunks, w_uk, w_uv, scale):
    rank = w_uk.shape[-1]
    flat = cache.double().view(-1, rank + ROPE)
    outs = []
    for chunk, table in zip(chunks, tables):
        n, ctx = len(chunk.token_ids), chunk.num_computed + len(chunk.token_ids)
        slots = torch.tensor([table[p // PAGE] * PAGE + p % PAGE for p in range(ctx)])
        c, k_pe = flat[slots].split([rank, ROPE], dim=-1)
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


@pytest.mark.parametrize("fp8", [False, True], ids=["cache-f32", "cache-fp8"])
@pytest.mark.parametrize("path", ["compiled", "torch", "torch-sliced"])
def test_cpu_attention_matches_the_definition(monkeypatch, path, fp8):
    """Decodes of many lengths (several block-count groups, ragged last blocks), speculative
    verification rows (3 queries), and prefill chunks with and without a cached prefix, in one
    batch over shuffled blocks: through the compiled decode kernel, and through the torch path
    that replaces it without a compiler (with tiny slices every group's gather is split). With
    an FP8 cache (kernels/latent_fp8.py) every path reads the entries the reference sees
    dequantized."""
    if path == "compiled" and not compiled_kernels():
        pytest.skip("no C++ compiler")
    if path != "compiled":
        monkeypatch.setenv("MLASERVE_CPU_DECODE", "off")
    monkeypatch.setattr(attention, "GATHER_SLICE_BYTES", 3000 if path == "torch-sliced" else 1 << 40)
    rng = random.Random(0)
    torch.manual_seed(0)
    num_blocks = 400
    rank = 128 if fp8 else RANK  # the FP8 layout scales groups of 128
    cache = torch.randn(num_blocks, PAGE, rank + ROPE)
    stored = cache
    if fp8:
        flat = cache.view(-1, rank + ROPE)
        stored = latent_fp8.quantize_entries(flat[:, :rank], flat[:, rank:]).view(num_blocks, PAGE, -1)
        cache = latent_fp8.dequantize_entries(stored, rank, torch.float32)
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
    w_uk, w_uv = torch.randn(HEADS, NOPE, rank) / 4, torch.randn(HEADS, V, rank) / 4
    with use_triton_kernels(False):
        plan = attention_plan.plan_attention(batch, q_nope, attention_plan.GatherBuffer())
        assert len(plan.prefills) == 3
        if path == "compiled":
            assert not plan.groups and plan.rows is not None and len(plan.rows.kv_lens) == 30 + 4 * 3
        else:
            assert len(plan.groups) > 3 and plan.rows is None
        out = attention.mla_attention(q_nope, q_pe, stored, plan, w_uk, w_uv, 0.3)
    ref = per_sequence_reference(q_nope, q_pe, cache, tables, chunks, w_uk, w_uv, 0.3)
    assert out.shape == (t, HEADS, V)
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-4), (out.double() - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_chunks_behind_one_prefix_expand_in_bounded_groups_and_each_row_once(dtype):
    """Chunks behind one cached prefix (a common system prompt): grouped so that what a group
    expands stays within `expand_limit` rows (a longer context alone); a group whose contexts
    share cache rows expands each row once and copies one chunk's context at a time. The output
    is the definition's either way, as with the whole step in one group. bf16 takes the compiled
    prefill kernel where the CPU has AMX (spans relative to each group's contexts, or per chunk)."""
    torch.manual_seed(1)
    rank = RANK
    cache = torch.randn(64, PAGE, rank + ROPE).to(dtype)
    prefix = [3, 9, 14, 20, 33]  # 40 cached tokens
    own = iter(range(40, 64))
    shapes = [(40, 10)] * 8 + [(0, 20), (40, 30), (7, 1)]  # (computed, new): prefix hits, a fresh prompt, a decode
    chunks, tables = [], []
    for computed, n in shapes:
        table = (prefix if computed >= 40 else []) + [next(own) for _ in range(-(-(computed + n) // PAGE) -
                                                                                (5 if computed >= 40 else 0))]
        tables.append(table)
        chunks.append(SequenceChunk([1] * n, computed, table))
    batch = ForwardBatch.build(chunks, PAGE)
    t = batch.query_start[-1]
    q_nope, q_pe = torch.randn(t, HEADS, NOPE).to(dtype), torch.randn(t, HEADS, ROPE).to(dtype)
    w_uk, w_uv = (torch.randn(HEADS, NOPE, rank) / 4).to(dtype), (torch.randn(HEADS, V, rank) / 4).to(dtype)
    ref = per_sequence_reference(q_nope, q_pe, cache, tables, chunks, w_uk, w_uv, 0.3)
    # limit -> (contexts per group, whether each group expands shared rows once). A group's rows:
    # its contexts', or where fewer, its distinct blocks' and its longest context's (a copy of it).
    expected = {None: ([[50] * 8 + [20, 70]], [True]),  # 210 distinct rows + 70 of 490
                160: ([[50] * 4, [50] * 4, [20, 70]], [True, True, False]),  # 13 blocks of 8 + 50 = 154 <= 160
                1: ([[50]] * 8 + [[20], [70]], [False] * 10)}
    outs = {}
    for limit, (contexts, shared) in expected.items():
        plan = attention_plan.plan_attention(batch, q_nope, attention_plan.GatherBuffer(), limit)
        assert [[p.context_len for p in g.chunks] for g in plan.prefill_groups] == contexts
        assert [g.rows is not None for g in plan.prefill_groups] == shared
        for g in plan.prefill_groups:
            if g.rows is not None:
                assert g.slots.unique().numel() == g.slots.numel() and g.rows.numel() == sum(g.spans[3])
        outs[limit] = attention.mla_attention(q_nope, q_pe, cache, plan, w_uk, w_uv, 0.3)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for limit, out in outs.items():
        assert torch.allclose(out.double(), ref, atol=tol, rtol=tol), (limit, (out.double() - ref).abs().max())
        assert torch.allclose(out, outs[None], atol=tol / 10, rtol=tol / 10), limit


def test_groups_pad_little():
    """Below 8 blocks every count gets its own group; beyond, a group spans counts within 12.5%
    of its smallest."""
    chunks = [SequenceChunk([1], n * PAGE - 1, list(range(n))) for n in [1, 2, 2, 3, 8, 9, 10, 40, 44, 45, 50]]
    batch = ForwardBatch.build(chunks, PAGE)
    groups = attention_plan._similar_lengths(batch, list(range(len(chunks))))
    counts = [sorted({-(-batch.context_lens[i] // PAGE) for i in g}) for g in groups]
    assert counts == [[1], [2], [3], [8, 9], [10], [40, 44, 45], [50]]


def skip_unless_compiled(monkeypatch, impl: str, dtype: torch.dtype) -> None:
    """Runs the decode family's `impl` variant, or skips saying why it cannot."""
    use_variant(monkeypatch, "decode", impl)
    if impl != "generic" and dtype != torch.bfloat16:
        pytest.skip("the vector implementations are bf16 only")


def shuffled_with_unwritten_rows(cache: torch.Tensor, lens: list[int], poison) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables over a random permutation of the cache's blocks for contexts of `lens`, and a
    copy of the cache whose rows past each context's end in its last block hold `poison` (never
    written: anything)."""
    page = cache.shape[1]
    perm = torch.randperm(cache.shape[0])
    tables = torch.zeros(len(lens), max(-(-n // page) for n in lens) + 1, dtype=torch.long)
    poisoned = cache.clone()
    used = 0
    for i, n in enumerate(lens):
        k = -(-n // page)
        tables[i, :k] = perm[used: used + k]
        poisoned[tables[i, k - 1], n - (k - 1) * page:] = poison
        used += k
    return tables, poisoned


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("impl", ["generic", "avx512", "amx"])
@pytest.mark.parametrize("splits", [None, 1, 3, 40])
@pytest.mark.parametrize("heads", [8, 32])
def test_compiled_decode_kernel_matches_reference(monkeypatch, dtype, impl, splits, heads):
    """DeepSeek-V3's cache geometry (512 + 64), 8 heads (AMX: one group of 8) and 32 (two groups
    of 16): ragged lengths with partial last blocks whose unwritten rows hold NaN, shuffled
    blocks, three query rows of one sequence at growing lengths, transposed (strided) queries and
    output, the output poisoned with NaN first; each implementation this CPU has; contexts split
    in 3, and in more pieces than they have blocks."""
    skip_unless_compiled(monkeypatch, impl, dtype)
    torch.manual_seed(1)
    rank, rope, page, num_blocks = 512, 64, 16, 300
    cache = torch.randn(num_blocks, page, rank + rope).to(dtype)
    lens = [1, 15, 16, 17, 40, 100, 250]
    tables, poisoned = shuffled_with_unwritten_rows(cache, lens, float("nan"))
    seq_of_row = torch.tensor(list(range(len(lens))) + [5, 5])  # sequence 5 verifies two more tokens
    kv_lens = torch.tensor(lens + [98, 99])
    rows = len(kv_lens)
    q_latent = torch.randn(heads, rows, rank).to(dtype).transpose(0, 1)
    q_pe = torch.randn(rows, heads, rope).to(dtype)
    out = torch.full((heads, rows, rank), float("nan"), dtype=dtype).transpose(0, 1)
    native.paged_mla_decode_cpu(q_latent, q_pe, poisoned, tables, seq_of_row, kv_lens, 0.06, max(lens),
                                num_splits=splits, impl=impl, out=out)
    ref = paged_mla_decode_ref(q_latent.float(), q_pe.float(), cache.float(), tables, seq_of_row, kv_lens, 0.06,
                               max(lens))
    assert not out.isnan().any()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err
    per_row = (out.float() - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))
    assert per_row.max() < (2e-2 if dtype == torch.bfloat16 else 1e-5), per_row


def causal_reference(q, k, v, spans, scale):
    """Per chunk and head in float64: query i at position k_len - q_len + i sees keys 0..it."""
    outs = {}
    for q0, nq, k0, nk in spans.t().tolist():
        qq, kk, vv = (t.double().transpose(0, 1) for t in (q[q0: q0 + nq], k[k0: k0 + nk], v[k0: k0 + nk]))
        scores = qq @ kk.transpose(1, 2) * scale
        hidden = torch.arange(nk)[None, :] > (nk - nq + torch.arange(nq))[:, None]
        outs[q0] = (scores.masked_fill(hidden, float("-inf")).softmax(-1) @ vv).transpose(0, 1)
    return outs


@each_variant("prefill")
@pytest.mark.parametrize("heads,nope,rope,v_dim", [(8, 64, 64, 64), (4, 128, 64, 128), (2, 32, 96, 64)])
def test_compiled_prefill_kernel_matches_reference(monkeypatch, variant, heads, nope, rope, v_dim):
    """The AMX prefill kernel over chunks that start from scratch and after a cached prefix, of
    lengths around its 16-query and 32-key steps, one past its 512-key softmax blocks, a chunk of
    one query; queries and keys in their nope and rope parts, the rope key one row shared by the
    heads (as MLA hands them), all strided inside wider tensors; the output poisoned with NaN, with
    rows outside every chunk that must stay untouched."""
    use_variant(monkeypatch, "prefill", variant)
    qk_dim = nope + rope
    assert native.prefill_attention_available(torch.bfloat16, nope, rope, v_dim)
    torch.manual_seed(3)
    q_lens, k_lens = [17, 1, 40, 16, 33, 300], [17, 9, 100, 16, 33, 1100]
    gap = 3  # rows between chunks that no chunk owns
    q_starts = [sum(q_lens[:i]) + gap * i for i in range(len(q_lens))]
    k_starts = [sum(k_lens[:i]) for i in range(len(k_lens))]
    t, total = q_starts[-1] + q_lens[-1] + gap, sum(k_lens)
    q = torch.randn(t, heads, qk_dim + 32).bfloat16()[..., 16: 16 + qk_dim]
    k_nope = torch.randn(total, heads, 2 * nope).bfloat16()[..., :nope]
    k_pe = torch.randn(total, rope + 8).bfloat16()[:, 8:, None].transpose(1, 2).expand(total, heads, rope)
    k = torch.cat([k_nope, k_pe], dim=-1)
    v = torch.randn(heads, total, v_dim).bfloat16().transpose(0, 1)
    out = torch.full((t, heads, v_dim), float("nan")).bfloat16()
    spans = torch.tensor([q_starts, q_lens, k_starts, k_lens])
    native.prefill_attention(q[..., :nope], q[..., nope:], k_nope, k_pe, v, spans, 0.09, out)
    owned = torch.zeros(t, dtype=torch.bool)
    for q0, nq, ref in zip(q_starts, q_lens, causal_reference(q, k, v, spans, 0.09).values()):
        owned[q0: q0 + nq] = True
        got = out[q0: q0 + nq].double()
        assert not got.isnan().any()
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (q0, nq, err)
    assert out[~owned].isnan().all()


def test_the_avx512_prefill_kernel_runs_only_when_asked(monkeypatch):
    """Slower than torch's attention where measured (kernels/cpu_build.py: OPT_IN): an AVX-512
    machine without AMX keeps torch's unless MLASERVE_CPU_PREFILL=avx512 asks for it."""
    reason = why_not_runnable("avx512")
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("MLASERVE_CPU_ISA", "avx512")
    monkeypatch.delenv("MLASERVE_CPU_PREFILL", raising=False)
    assert cpu_build.variant("prefill") is None and cpu_build.variant("linear") == "avx512"
    assert not native.prefill_attention_available(torch.bfloat16, 128, 64, 128)
    monkeypatch.setenv("MLASERVE_CPU_PREFILL", "avx512")
    assert cpu_build.variant("prefill") == "avx512"


def test_compiled_prefill_kernel_refuses_what_it_cannot_take():
    if not compiled_kernels():
        pytest.skip("no C++ compiler")
    if not native.prefill_attention_available(torch.bfloat16, 64, 64, 64):
        pytest.skip("this CPU has no AMX")
    qn, qp, kn, kp, v = (torch.zeros(4, 2, d, dtype=torch.bfloat16) for d in (64, 64, 64, 64, 64))
    out = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="fewer keys"):
        native.prefill_attention(qn, qp, kn, kp, v, torch.tensor([[0], [4], [0], [3]]), 0.1, out)
    with pytest.raises(RuntimeError, match="refused"):  # parts not in whole 32-dim tiles
        native.prefill_attention(qn[..., :48], qp[..., :16], kn[..., :48], kp[..., :16], v,
                                 torch.tensor([[0], [2], [0], [2]]), 0.1, out)
    with pytest.raises(ValueError, match="past its tensor"):
        native.prefill_attention(qn, qp, kn, kp, v, torch.tensor([[0], [2], [2], [3]]), 0.1, out)
    with pytest.raises(ValueError, match="want bf16"):
        native.prefill_attention(qn.float(), qp, kn, kp, v, torch.tensor([[0], [2], [0], [2]]), 0.1, out)
    assert not native.prefill_attention_available(torch.bfloat16, 64, 64, 48)
    assert not native.prefill_attention_available(torch.bfloat16, 48, 16, 64)


@each_variant("decode")
def test_the_fastest_implementation_is_chosen(monkeypatch, variant):
    """The best implementation under the family's variant that takes the shapes."""
    use_variant(monkeypatch, "decode", variant)
    assert native.choose_impl(torch.bfloat16, 128, 512, 64, 64) == variant
    assert native.choose_impl(torch.float32, 128, 512, 64, 64) == "generic"
    assert native.choose_impl(torch.bfloat16, 6, 512, 64, 64) == "generic"  # no 4- or 8-head groups


def test_compiled_decode_kernel_refuses_mismatched_dtypes():
    if not compiled_kernels():
        pytest.skip("no C++ compiler")
    cache = torch.zeros(2, 4, 576, dtype=torch.bfloat16)
    one = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(TypeError, match="a cache of their dtype"):
        native.paged_mla_decode_cpu(torch.zeros(1, 4, 512), torch.zeros(1, 4, 64), cache, one[None], one, one + 1,
                                    0.1, 1)


def test_compiled_decode_kernel_is_never_handed_device_memory():
    """The torch reference on GPU tensors (as the GPU parity tests run it) plans the gathering
    path, and the compiled kernel refuses non-host tensors instead of reading their pointers as
    host memory (it crashed the process on the H100 before this check). `meta` stands in for CUDA."""
    batch = ForwardBatch.build([SequenceChunk([1], 5, [0])], PAGE)
    plan = attention_plan.plan_attention(batch, torch.zeros(1, device="meta"))
    assert plan.rows is None and len(plan.groups) == 1
    if not compiled_kernels():
        pytest.skip("no C++ compiler")
    one = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="host memory"):
        native.paged_mla_decode_cpu(torch.zeros(1, 4, 512, device="meta"), torch.zeros(1, 4, 64),
                                    torch.zeros(2, 4, 576), one[None], one, one + 1, 0.1, 1)


def test_a_failed_build_falls_back_to_the_torch_path(monkeypatch, tmp_path, caplog):
    """A compiler that fails leaves no library (and a warning naming why): the CPU path then
    plans its torch attention instead; MLASERVE_NATIVE=0 does the same on purpose."""
    monkeypatch.setenv("MLASERVE_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CXX", "false")
    cpu_build.library.cache_clear()
    cpu_build.runnable_variants.cache_clear()
    try:
        assert native.library() is None
        assert "building the CPU kernels (generic) failed" in caplog.text
        batch = ForwardBatch.build([SequenceChunk([1], 5, [0])], PAGE)
        plan = attention_plan.plan_attention(batch, torch.zeros(1))
        assert plan.rows is None and len(plan.groups) == 1
        monkeypatch.delenv("CXX")
        monkeypatch.setenv("MLASERVE_NATIVE", "0")
        cpu_build.library.cache_clear()
        cpu_build.runnable_variants.cache_clear()
        assert native.library() is None
    finally:
        cpu_build.library.cache_clear()
        cpu_build.runnable_variants.cache_clear()
