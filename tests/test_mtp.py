"""The MTP module equals its plain-torch reference (transformers' decoder layer inside), fp32,
through the paged cache, prefilled in chunks with several sequences in one batch; run for a few
rows' outputs (out_rows, as drafting runs it), those rows of the full pass."""

import pytest
import torch

from engine.model_config import ModelConfig
from kernels.attention_plan import SHORT_QUERY_MAX, OutputRows, plan_output_rows
from kernels.forward_batch import ForwardBatch, SequenceChunk
from model.deepseek_v3 import DeepseekV3
from model.hf_reference import load_hf_model_with_mtp
from model.loader import load_weights
from model.mtp import MTPModule
from tests.model_runner_util import PagedRunner


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    cfg = ModelConfig.from_checkpoint(tiny_checkpoint)
    w = load_weights(tiny_checkpoint, cfg, torch.float32, include_mtp=True)
    main = DeepseekV3(cfg, w)
    return main, MTPModule(cfg, w, main), *load_hf_model_with_mtp(tiny_checkpoint, torch.float32)


def test_mtp_logits_match_the_reference_chunk_by_chunk(models):
    main, mtp, hf, ref_mtp = models
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, main.cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 40, 70)]
    runner = PagedRunner(main, block_size=8)
    cache = runner.cache.layer(mtp.layer_idx)
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(prompts))}
    # Chunks of 16: MTP position p reads token p + 1, which for a chunk's last position is the
    # first token of the next chunk. The module's attention spans earlier chunks' entries.
    for start in range(0, 70, 16):
        work = {i: p[start : start + 16] for i, p in enumerate(prompts) if start < len(p) - 1}
        chunks = [runner._chunk(i, toks) for i, toks in work.items()]
        batch = ForwardBatch.build(chunks, runner.block_size)
        with torch.inference_mode():
            hidden = main(batch, [runner.cache.layer(i) for i in range(main.cfg.num_cache_layers)])
            rows, mtp_chunks = [], []
            for j, (i, toks) in enumerate(work.items()):
                n = min(len(toks), len(prompts[i]) - 1 - start)  # the last token has no successor here
                mtp_chunks.append(SequenceChunk(prompts[i][start + 1 : start + 1 + n], start, chunks[j].block_table))
                rows += range(batch.query_start[j], batch.query_start[j] + n)
            mtp_batch = ForwardBatch.build(mtp_chunks, runner.block_size)
            h = mtp(mtp_batch, hidden[torch.tensor(rows)], cache)
            logits = mtp.logits(h)
            # The drafting pass wants a few rows' outputs (each request's last): the same rows of
            # the full pass's output, out of order too, and the same entries written again.
            seqs = list(range(len(mtp_chunks)))[::-1] + [0]
            picked = [mtp_batch.query_start[j + 1] - 1 for j in seqs[:-1]] + [0]
            positions = [start + len(mtp_chunks[j].token_ids) - 1 for j in seqs[:-1]] + [start]
            before = cache.clone()
            alone = plan_output_rows(mtp_batch, picked, seqs, positions, hidden)
            # Where a chunk is a long query (over 8 tokens), the rows attend alone.
            assert (alone.plan is not None) == any(len(c.token_ids) > SHORT_QUERY_MAX for c in mtp_chunks)
            for out_rows in (alone, OutputRows(alone.index)):
                only = mtp(mtp_batch, hidden[torch.tensor(rows)], cache, out_rows=out_rows)
                assert only.shape == (len(picked), h.shape[1])
                assert _rel_err(only, h[torch.tensor(picked)]) < 1e-5 and torch.equal(cache, before)
            nothing = OutputRows(torch.tensor([], dtype=torch.long))
            none = mtp(mtp_batch, hidden[torch.tensor(rows)], cache, out_rows=nothing)
            assert none.shape == (0, h.shape[1]) and torch.equal(cache, before)
        at = 0
        for j, i in enumerate(work):
            n = len(mtp_chunks[j].token_ids)
            got[i].append(logits[at : at + n])
            at += n
        for i, toks in work.items():
            runner.computed[i] = runner.computed.get(i, 0) + len(toks)
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            _, ref = ref_mtp(hf, torch.tensor([p]))
            ours = torch.cat(got[i])
            assert ours.shape == ref[0].shape
            err = _rel_err(ours, ref[0])
            assert err < 1e-4, f"prompt of length {len(p)}"
            assert (ours.argmax(-1) == ref[0].argmax(-1)).all()
