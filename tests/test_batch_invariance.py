"""The batch-invariant mode (kernels/batch_invariant.py) on the kernel path, interpreted: a row's
bits never depend on the rows beside it, so greedy tokens are the same alone and in any batch.

Without the mode the kernel path's dense products (F.linear, bmm) are the host BLAS's, whose
rounding follows the number of rows: measured here, the lm_head's logits and every decode step's
absorbed attention products differed in their last bits between a sequence alone and batched, and
on an AMD EPYC that flipped the fourth greedy token of [5, 9, 77, 200, 3] (issue 27).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from engine.model_config import ModelConfig
from kernels.backend import batch_invariant_mode, interpreting, use_triton_kernels
from kernels.batch_invariant import dense_bmm, dense_linear, invariant_bmm
from kernels.mla_decode import choose_num_splits, paged_mla_decode
from model.deepseek_v3 import DeepseekV3
from model.loader import load_weights
from tests.interpreter_util import row_invariant_interpreter_dot
from tests.model_runner_util import PagedRunner
from tests.test_kernels import make_cache, shuffled_tables


@pytest.fixture(autouse=True)
def _row_invariant_dots():
    """The GPU's tile rows are independent; the interpreter's are made so (tests/interpreter_util.py)."""
    with row_invariant_interpreter_dot() if interpreting() else contextlib.nullcontext():
        yield

# Prefill chunks (11 tokens: over SHORT_QUERY_MAX) and the short queries the decode kernel takes
# (3 tokens); long contexts are
# test_decode_attention_rows_are_the_same_alone_and_batched's.
PROMPTS = [[5, 9, 77, 200, 3], [100 + i for i in range(11)], [17, 250, 31], [42, 7, 7, 9, 180, 64, 3, 11]]
NEW_TOKENS = 2  # the prompt's last position and one decode step, each compared
# Every sequence in a batch of each size, at other rows than alone.
BATCHES = {2: [[0, 1], [3, 2]], 3: [[2, 0, 1], [1, 3, 2]], 4: [[2, 0, 3, 1]]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_of_the_product_is_the_same_alone_and_batched(dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 37, 100, generator=g).to(dtype)  # K and N not multiples of the tile
    b = torch.randn(3, 70, 100, generator=g).to(dtype).transpose(1, 2)  # a strided [B, K, N]
    with use_triton_kernels(True), batch_invariant_mode():
        whole = invariant_bmm(a, b)
        for row in (0, 5, 31, 32, 36):  # first, inside, either side of a tile edge and last rows
            assert torch.equal(invariant_bmm(a[:, row : row + 1], b)[:, 0], whole[:, row])
        assert torch.equal(dense_bmm(a, b), whole)
        w = b[0].t()  # [N, K], as a linear's weight
        assert torch.equal(dense_linear(a[0, :7], w), whole[0, :7])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(whole.float(), torch.bmm(a.float(), b.float()), rtol=tol, atol=tol * 10)


def test_without_the_mode_the_products_are_torchs():
    a, w = torch.randn(4, 8), torch.randn(6, 8)
    with use_triton_kernels(True), batch_invariant_mode(False):
        assert torch.equal(dense_linear(a, w), torch.nn.functional.linear(a, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_rows_are_the_same_alone_and_batched(dtype):
    """Contexts long enough that the split count would follow the batch's rows and its longest
    context; in the mode each row is reduced unsplit, in one order."""
    page, heads, lens = 16, 16, [1, 300, 700, 17, 1000]
    num_blocks = sum(-(-n // page) for n in lens) + 2
    torch.manual_seed(0)
    cache = make_cache(num_blocks, page, dtype)
    tables = shuffled_tables(lens, page, num_blocks)
    q_lat, q_pe = torch.randn(len(lens), heads, 512, dtype=dtype), torch.randn(len(lens), heads, 64, dtype=dtype)
    rows, kv_lens = torch.arange(len(lens)), torch.tensor(lens)
    assert len({choose_num_splits(n, 1, max(lens), q_lat.device) for n in (1, len(lens))}) == 2
    with use_triton_kernels(True), batch_invariant_mode():
        batched = paged_mla_decode(q_lat, q_pe, cache, tables, rows, kv_lens, 0.07, max(lens))
        for i, n in enumerate(lens):
            one = paged_mla_decode(q_lat[i : i + 1], q_pe[i : i + 1], cache, tables, rows[i : i + 1],
                                   kv_lens[i : i + 1], 0.07, n)
            assert torch.equal(one[0], batched[i]), (dtype, n)


def _greedy(runner: PagedRunner, seqs: list[int]) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
    """Greedy tokens and each step's last-position logits of PROMPTS[s] for s in seqs, batched."""
    out = {s: ([], []) for s in seqs}
    logits = runner.step({s: PROMPTS[s] for s in seqs})
    for step in range(NEW_TOKENS):
        for s in seqs:
            last = logits[s][-1]
            out[s][0].append(int(last.argmax()))
            out[s][1].append(last.clone())
        if step + 1 < NEW_TOKENS:
            logits = runner.step({s: out[s][0][-1:] for s in seqs})
    return out


# bf16, the CPU default and the dtype whose rounding flips tokens soonest; float32's rows are pinned
# op by op above (a model-level float32 run cost ~90 s of the suite under the interpreter).
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_each_sequence_decodes_the_same_alone_and_in_batches_of_2_to_4(tiny_checkpoint, dtype):
    cfg = ModelConfig.from_checkpoint(tiny_checkpoint)
    with use_triton_kernels(True), batch_invariant_mode():
        model = DeepseekV3(cfg, load_weights(tiny_checkpoint, cfg, getattr(torch, dtype), include_mtp=False,
                                             keep_fp8=True))
        alone = {s: _greedy(PagedRunner(model, num_blocks=64, block_size=16), [s])[s] for s in range(len(PROMPTS))}
        seen = set()
        for size, batches in BATCHES.items():
            for batch in batches:
                got = _greedy(PagedRunner(model, num_blocks=64, block_size=16, seed=size), batch)
                for s in batch:
                    seen.add((s, size))
                    assert got[s][0] == alone[s][0], (dtype, s, batch)
                    for step, (x, y) in enumerate(zip(got[s][1], alone[s][1])):
                        assert torch.equal(x, y), (dtype, s, batch, step)
    assert seen == {(s, n) for s in range(len(PROMPTS)) for n in (2, 3, 4)}
