"""Decode steps through engine/decode_graphs.py's static buffers and padding, on the kernel path
(the Triton interpreter here; a rerun stands in for each CUDA graph), against plain forwards of
the same model over an identical cache. And what a CUDA graph capture forbids: a host sync or a
tensor made from host data inside the captured forward."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine import LLM, SamplingParams
from engine.decode_graphs import DecodeGraphs, RerunReplay, capture_sizes
from engine.model_config import ModelConfig
from kernels.backend import batch_invariant_mode, use_triton_kernels
from kernels.forward_batch import ForwardBatch, SequenceChunk
from model.deepseek_v3 import DeepseekV3
from model.loader import load_weights
from model.moe import MoE
from model.mtp import MTPModule
from tests.model_runner_util import PagedRunner

BLOCK_SIZE = 16
MAX_MODEL_LEN = 256
PROMPTS = [[5, 9, 77, 200], [3], [100 + i for i in range(10)], [17, 250, 31, 31, 8], [42, 43]]


def test_capture_sizes_step_at_most_half_again_and_end_at_max_num_seqs():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert capture_sizes(100)[-2:] == [96, 100]
    assert capture_sizes(4096)[-1] == 512
    sizes = capture_sizes(512)
    assert all(b <= 2 * a for a, b in zip(sizes, sizes[1:]))


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    cfg = ModelConfig.from_checkpoint(tiny_checkpoint)
    with use_triton_kernels(True):
        yield DeepseekV3(cfg, load_weights(tiny_checkpoint, cfg, torch.float32, include_mtp=False, keep_fp8=True))


def empty_cache(model: DeepseekV3, blocks: int = 3) -> list[torch.Tensor]:
    cfg = model.cfg
    return [torch.zeros(blocks, BLOCK_SIZE, cfg.kv_lora_rank + cfg.qk_rope_head_dim)] * cfg.num_cache_layers


def layers(runner: PagedRunner) -> list[torch.Tensor]:
    return [runner.cache.layer(i) for i in range(runner.model.cfg.num_cache_layers)]


def test_graph_decode_steps_match_plain_forwards(model):
    """Five prompts, then a decode step of 5 sequences (padded to 8) and, after two finish, two of
    3 (padded to 4, over a row the 5-sequence step left behind). Two runners with the same shuffled
    block order hold identical caches; the scratch block (the pool's last) is never handed out."""
    with use_triton_kernels(True):
        plain, graphed = (PagedRunner(model, num_blocks=33, block_size=BLOCK_SIZE) for _ in range(2))
        scratch = 32
        for r in (plain, graphed):
            r.free.remove(scratch)
        # Blocks no request holds read 7 in the graphed run's cache: the padding may write the
        # scratch block's first slot and nothing else.
        graphed.cache.data.fill_(7.0)
        graphs = DecodeGraphs(model, layers(graphed), BLOCK_SIZE, max_num_seqs=8, max_model_len=MAX_MODEL_LEN,
                              scratch_block=scratch, make_replay=RerunReplay)
        assert sorted(graphs.replays) == [1, 2, 4, 8]
        first = plain.step(dict(enumerate(PROMPTS)))
        assert torch.equal(graphed.step(dict(enumerate(PROMPTS)))[0], first[0])
        moes = [m for m in model.modules() if isinstance(m, MoE)]
        tokens = {i: int(first[i][-1].argmax()) for i in range(len(PROMPTS))}
        for step in range(3):
            if step == 1:
                del tokens[1], tokens[3]
            work = {i: [t] for i, t in tokens.items()}
            for m in moes:
                m.routed_tokens.zero_()
            expected = plain.step(work)
            counted = sum(int(m.routed_tokens.sum()) for m in moes)

            chunks = [graphed._chunk(i, toks) for i, toks in work.items()]
            size = graphs.size_for(chunks)
            assert size == (8 if len(work) == 5 else 4)
            for m in moes:
                m.routed_tokens.zero_()
            with torch.inference_mode():
                got = model.logits(graphs.run(chunks, size))
            # Padding rows do not count in the routing metric: the same choices as the plain step.
            assert sum(int(m.routed_tokens.sum()) for m in moes) == counted
            assert counted == len(work) * len(moes) * model.cfg.num_experts_per_tok
            for row, i in enumerate(work):
                graphed.computed[i] += 1
                # The graph's decode kernel splits the context for the longest possible one: the
                # same sums in another order.
                torch.testing.assert_close(got[row], expected[i][-1], rtol=1e-4, atol=1e-4)
                assert int(got[row].argmax()) == int(expected[i][-1].argmax())
                tokens[i] = int(expected[i][-1].argmax())
        # Every request's cache entries are the plain run's; the padding wrote the scratch block's
        # first slot and nothing else.
        written = torch.tensor([t[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                                for i, t in graphed.tables.items() for p in range(graphed.computed[i])])
        others = torch.ones(33 * BLOCK_SIZE, dtype=torch.bool)
        others[written] = False
        others[scratch * BLOCK_SIZE] = False
        for a, b in zip(layers(plain), layers(graphed)[: model.cfg.num_hidden_layers]):  # not the MTP's
            a, b = a.flatten(0, 1), b.flatten(0, 1)
            torch.testing.assert_close(b[written], a[written], rtol=1e-5, atol=1e-5)
            assert (b[others] == 7).all() and (b[scratch * BLOCK_SIZE] != 7).any()


@pytest.fixture(scope="module")
def model_with_mtp(tiny_checkpoint):
    cfg = ModelConfig.from_checkpoint(tiny_checkpoint)
    with use_triton_kernels(True):
        w = load_weights(tiny_checkpoint, cfg, torch.float32, include_mtp=True, keep_fp8=True)
        main = DeepseekV3(cfg, w)
        yield main, MTPModule(cfg, w, main)


def test_verification_steps_and_mtp_passes_match_plain_forwards(model_with_mtp):
    """Speculative decoding's steps through the graphs, whose rows are tokens: a step of three
    sequences verifying 2, 0 and 1 drafts (6 rows, padded to 8), the MTP layer's first pass over
    the same rows and a chained pass over two of them, against the plain forwards over an
    identical cache, MTP cache layer included."""
    model, mtp = model_with_mtp
    with use_triton_kernels(True):
        plain, graphed = (PagedRunner(model, num_blocks=33, block_size=BLOCK_SIZE) for _ in range(2))
        scratch = 32
        for r in (plain, graphed):
            r.free.remove(scratch)
        graphs = DecodeGraphs(model, layers(graphed), BLOCK_SIZE, max_num_seqs=3, max_model_len=MAX_MODEL_LEN,
                              scratch_block=scratch, make_replay=RerunReplay, mtp=mtp, max_query=3, sizes=[8, 2])
        assert sorted(graphs.replays) == sorted(graphs.first_replays) == sorted(graphs.chain_replays) == [2, 8]
        assert capture_sizes(3 * 3) == [1, 2, 4, 8, 9]  # (the sizes it takes by default: rows, not sequences)
        prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]  # (short: the interpreter's prefill is slow)
        assert torch.equal(graphed.step(dict(enumerate(prompts)))[0], plain.step(dict(enumerate(prompts)))[0])
        work = {0: [11, 12, 13], 1: [14], 2: [15, 16]}  # a known token and the drafts it verifies
        chunks = [graphed._chunk(i, toks) for i, toks in work.items()]
        assert graphs.size_for(chunks) == 8
        plain_chunks = [plain._chunk(i, toks) for i, toks in work.items()]
        batch = ForwardBatch.build(plain_chunks, BLOCK_SIZE)
        mtp_layer = model.cfg.num_hidden_layers
        next_ids = [12, 13, 40, 41, 16, 42]  # each row's next token: its successor, else the one sampled
        with torch.inference_mode():
            expected = plain.model(batch, layers(plain))
            got = graphs.run(chunks, 8)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            first = mtp(batch, expected, layers(plain)[mtp_layer], torch.tensor(next_ids))
            got_first = graphs.run_first_pass(next_ids)
            torch.testing.assert_close(got_first, first, rtol=1e-4, atol=1e-4)
            # Drafts chained from row 2 (sequence 0, position of its last row) and row 5.
            rows = torch.tensor([2, 5])
            for r in (plain, graphed):
                for i, toks in work.items():
                    r.computed[i] += len(toks)
            chain = [SequenceChunk([43], graphed.computed[0], graphed.tables[0]),
                     SequenceChunk([44], graphed.computed[2], graphed.tables[2])]
            assert graphs.size_for(chain) == 2
            plain_chain = [SequenceChunk([43], plain.computed[0], plain.tables[0]),
                           SequenceChunk([44], plain.computed[2], plain.tables[2])]
            chained = mtp(ForwardBatch.build(plain_chain, BLOCK_SIZE), first[rows], layers(plain)[mtp_layer])
            got_chained = graphs.run_chained_pass(chain, got_first[rows], 2)
            torch.testing.assert_close(got_chained, chained, rtol=1e-4, atol=1e-4)
            assert graphs.size is None  # (a first pass now would read rows the chain overwrote)
        for i, t in graphed.tables.items():
            for layer in range(model.cfg.num_cache_layers):
                a = layers(plain)[layer].flatten(0, 1)[[plain.tables[i][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                                                       for p in range(plain.computed[i] + (i != 1))]]
                b = layers(graphed)[layer].flatten(0, 1)[[t[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                                                         for p in range(graphed.computed[i] + (i != 1))]]
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)  # (as the hidden states: the layers after)


def test_steps_a_graph_cannot_run_run_eagerly(model):
    with use_triton_kernels(True):
        graphs = DecodeGraphs(model, empty_cache(model), BLOCK_SIZE,
                              max_num_seqs=2, max_model_len=MAX_MODEL_LEN, scratch_block=2, make_replay=RerunReplay)
    one = SequenceChunk([7], 3, [0])
    assert graphs.size_for([one]) == 1 and graphs.size_for([one, one]) == 2
    assert graphs.size_for([one] * 3) is None  # more sequences than the largest graph
    assert graphs.size_for([one, SequenceChunk([7, 8], 3, [0])]) is None  # a verification or prefill chunk
    assert graphs.size_for([SequenceChunk([7], 3, [0] * (MAX_MODEL_LEN // BLOCK_SIZE + 1))]) is None  # wider table


class CaptureChecker(TorchDispatchMode):
    """Records operators a CUDA graph capture cannot hold: ones that read a device value on the
    host (item, tolist, nonzero and other data-sized outputs; bincount sizes its output so) and
    tensors made from host data, which on a GPU would be a copy from pageable memory."""

    FORBIDDEN = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.bincount",
                 "aten.unique_dim", "aten._unique2", "aten.unique_consecutive", "aten.lift_fresh",
                 "aten.repeat_interleave", "aten.is_nonzero", "aten.equal", "aten.item"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in self.FORBIDDEN:
            self.seen.append(name)
        if func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.seen.append("boolean index")
        return func(*args, **(kwargs or {}))


def test_captured_forward_has_no_host_sync(model, model_with_mtp):
    """The function each CUDA graph captures, run under a checker: the whole decode forward (MLA,
    cache write, decode kernel, router, fused MoE, norms, FP8 GEMMs) and the MTP layer's passes
    issue nothing that would break a capture or bake one step's host values into the graph."""
    checker = CaptureChecker()

    class CheckedRerun(RerunReplay):
        def capture(self, fn):
            with checker:
                return super().capture(fn)

    with use_triton_kernels(True):
        DecodeGraphs(model, empty_cache(model), BLOCK_SIZE,
                     max_num_seqs=3, max_model_len=MAX_MODEL_LEN, scratch_block=2, make_replay=CheckedRerun)
        main, mtp = model_with_mtp
        with_mtp = DecodeGraphs(main, empty_cache(main), BLOCK_SIZE, max_num_seqs=1, max_model_len=MAX_MODEL_LEN,
                                scratch_block=2, make_replay=CheckedRerun, mtp=mtp, max_query=2)
        assert sorted(with_mtp.first_replays) == sorted(with_mtp.chain_replays) == [1, 2]
        assert checker.seen == []
        # The checker does see what it looks for: a plain forward plans its attention from host lists.
        batch = ForwardBatch.build([SequenceChunk([7], 3, [0])], BLOCK_SIZE)
        with checker, torch.inference_mode():
            model(batch, empty_cache(model))
    assert "aten.lift_fresh" in checker.seen


def test_engine_with_graphs_gives_the_eager_engines_tokens(tiny_checkpoint, monkeypatch):
    """The worker process on the kernel path (interpreted), through its real scheduler: prefill
    steps run eagerly, decode steps of 3, 2 and 1 sequences replay the sizes 4, 2 and 1 as the
    requests finish one by one, and the pool's last block is kept from the scheduler. The padding
    changes each step's row count, so the tokens are the same only where no product's rounding
    follows the row count: in the batch-invariant mode (tests/test_batch_invariance.py)."""
    monkeypatch.setenv("MLASERVE_KERNELS", "triton")
    block_bytes = 576 * 4 * 4 * BLOCK_SIZE  # float32 x (3 layers + MTP)
    prompts = [[5, 9, 77, 200, 3], [100 + i for i in range(10)], [17, 250, 31]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (4, 2, 3)]
    outputs, tokens = {}, {}
    for graphs in (False, True):
        with LLM(tiny_checkpoint, dtype="float32", block_size=BLOCK_SIZE, max_num_seqs=4, max_model_len=MAX_MODEL_LEN,
                 kv_cache_memory=(8 + graphs) * block_bytes, cuda_graphs=graphs, batch_invariant=True) as llm:
            tokens[graphs] = llm.kv_cache_tokens
            outputs[graphs] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert tokens[True] == tokens[False] == 8 * BLOCK_SIZE
    assert outputs[True] == outputs[False]
    assert [len(o) for o in outputs[True]] == [4, 2, 3]


def test_speculative_steps_replay_their_graphs(tiny_checkpoint, monkeypatch):
    """The model runner with speculation (k = 2) and graphs, under its real scheduler in this
    process (one sequence at a time: the interpreter is slow, and batches of them are the test
    above's): verification steps replay the main graphs, the MTP layer's first and chained passes
    theirs, and the tokens are plain greedy decoding's (batch-invariant mode, where speculation
    is lossless row for row)."""
    import collections

    from engine.config import EngineConfig
    from engine.engine_core import EngineCore
    from engine.messages import AddRequest, WorkerReady
    from engine.model_runner import ModelRunner

    monkeypatch.setenv("MLASERVE_KERNELS", "triton")
    prompts = [[5, 9, 77, 200, 3], [17, 250, 31]]
    replayed, tokens = collections.Counter(), collections.defaultdict(list)
    config = EngineConfig(model_dir=str(tiny_checkpoint), dtype="float32", block_size=BLOCK_SIZE, max_num_seqs=1,
                          max_model_len=MAX_MODEL_LEN, kv_cache_memory=1 << 20, cuda_graphs=True,
                          batch_invariant=True, num_speculative_tokens=2, speculative_draft_policy="fixed",
                          async_scheduling=False)
    with batch_invariant_mode(False):  # (the runner turns the process's mode on: it is put back after)
        runner = ModelRunner(config)
        try:
            for kind in ("replays", "first_replays", "chain_replays"):
                for size, replay in getattr(runner.graphs, kind).items():
                    def counted(key=(kind, size), run=replay.replay):
                        replayed[key] += 1
                        run()
                    replay.replay = counted
            ready = WorkerReady(0, runner.num_blocks, runner.kv_bytes_per_token, runner.cfg.vocab_size,
                                runner.max_model_len, runner.step_peak_bytes)
            core = EngineCore(config, [ready], None, lambda plans: [runner.execute(plans[0])])
            for i, p in enumerate(prompts):
                core.add(AddRequest(str(i), p, SamplingParams(temperature=0, max_tokens=4 + i, ignore_eos=True)))
            while core.has_work():
                for d in core.step():
                    tokens[d.req_id] += d.new_token_ids
            with use_triton_kernels(True), batch_invariant_mode():
                plain = PagedRunner(runner.model, num_blocks=8, block_size=BLOCK_SIZE).greedy(prompts, 5)
        finally:
            runner.close()
    assert [tokens[str(i)] for i in range(2)] == [plain[0][:4], plain[1][:5]]
    kinds = collections.Counter(kind for kind, _ in replayed.elements())
    assert kinds["replays"] and kinds["first_replays"] and kinds["chain_replays"], replayed
    # Verification steps: rows of several tokens a sequence (up to 3 rows).
    assert any(size > 1 for kind, size in replayed if kind == "replays"), replayed
