"""Decode steps replayed from CUDA graphs, so that a step costs one launch on the host, not one
per kernel.

A DeepSeek-V3 decode step dispatches a few thousand kernels, and on the H100 the small model's
decode step took 16 ms of host time for 2.3 ms of GPU time (docs/benchmarks.md): launch-bound.
As vLLM and SGLang do, the worker captures the model's forward once per batch size of a ladder
(`capture_sizes`) over static input buffers, and a decode step whose sequences each compute one
token is padded up to the next captured size, copied into the buffers and replayed.

What a graph fixes at capture and how each step still gets the right answer:
- shapes: the batch is padded with rows that compute token 0 at position 0 and write their latent
  entry into a scratch block that the scheduler never hands out (the pool's last block), and
  attend to that entry alone; their outputs are dropped and the MoE's routing counts skip them
  (`ForwardBatch.real_tokens`);
- the decode kernel's split count, chosen from the longest possible context (the split length is
  worked out per row on the device, so any context length is right);
- the block tables' width: the longest possible context's; padding rows read a table of their own.

With speculative decoding a graph's rows are tokens, not sequences: a verification step's
sequences each compute their known token and the drafts they verify (up to 1 + k rows, each row a
query of its own causal length over its sequence's block table, `seq_of_row`), and the MTP layer
has graphs of its own over the same rows: its first pass over the main graph's output (every row
goes through the layer: a captured graph cannot take the step's subset of drafting rows), and
a chained pass over one row a drafting request. The MTP's logits and argmax run after the replay.

Graphs need CUDA. Where the Triton kernels run on the CPU (the interpreter, in tests), the same
buffers and padding run with `RerunReplay` in place of a graph: replaying reruns the captured
function. Steps with a longer prefill chunk or more rows than the largest size run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.attention_plan import AttentionPlan, DecodeRows
from kernels.backend import cdiv
from kernels.forward_batch import ForwardBatch, SequenceChunk
from model.deepseek_v3 import DeepseekV3
from model.mtp import MTPModule

# Batch sizes with a graph: doubling up to 16, then steps of at most 1.5x (so that from 16 up the
# padding is under a third of a step), capped at max_num_seqs; bigger steps run eagerly.
CAPTURE_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in CAPTURE_LADDER if s < max_num_seqs]
    return sizes + [min(max_num_seqs, CAPTURE_LADDER[-1])]


class CudaGraphReplay:
    """One captured CUDA graph. Every graph of a worker allocates from one memory pool, captured
    largest first, so their intermediates share memory (only one replays at a time)."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        # Once outside the capture first: Triton compiles and allocates then, which a capture forbids.
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph, pool=self.pool):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


class RerunReplay:
    """A graph's stand-in where there is no GPU: replaying reruns the function on the same
    buffers and leaves its result in the tensor the capture returned, as a replay would."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self) -> None:
        self.out.copy_(self.fn())


class DecodeGraphs:
    """The captured decode forwards of one worker's model and their static inputs; with `mtp`,
    also the MTP layer's passes over the same rows (speculative decoding's drafts). `sizes`: the
    row counts to capture (default: the ladder up to max_num_seqs x max_query)."""

    def __init__(self, model: DeepseekV3, cache_layers: list[torch.Tensor], block_size: int, max_num_seqs: int,
                 max_model_len: int, scratch_block: int, make_replay: Callable[[], CudaGraphReplay | RerunReplay],
                 mtp: MTPModule | None = None, max_query: int = 1, sizes: list[int] | None = None):
        self.model = model
        self.cache_layers = cache_layers
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.scratch_block = scratch_block
        self.max_query = max_query
        # A graph's size is its rows: a step of sequences that each compute up to max_query
        # tokens (a decode, a verification of drafts, a short prompt) takes the size of its tokens.
        self.sizes = sorted(sizes) if sizes else capture_sizes(max_num_seqs * max_query)
        device = model.embed_tokens.device
        most = self.sizes[-1]
        # Per row: token id, position, cache slot, counted in the routing metric (1) or not (0).
        # Every row starts as padding: token 0 at position 0, its entry in the scratch block's
        # first slot, one cached token to attend to (its own), not counted, and the block table
        # of row `most`, all scratch.
        self.tokens = torch.zeros(4, most, dtype=torch.long, device=device)
        self.tokens[2] = scratch_block * block_size
        self.kv_lens = torch.ones(most, dtype=torch.int32, device=device)
        self.seq_of_row = torch.full((most,), most, dtype=torch.int32, device=device)
        self.block_tables = torch.full((most + 1, cdiv(max_model_len, block_size)), scratch_block, dtype=torch.long,
                                       device=device)
        self.replays: dict[int, CudaGraphReplay | RerunReplay] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.mtp = mtp
        if mtp is not None:
            # The first pass reads the main graph's output and each row's next token; a chained
            # pass reads the last pass's outputs of the drafting rows and their drafts (tokens[0]).
            self.mtp_cache = cache_layers[mtp.layer_idx]
            self.next_ids = torch.zeros(most, dtype=torch.long, device=device)
            self.chain_hidden = torch.zeros(most, model.cfg.hidden_size, dtype=model.dtype, device=device)
            self.first_replays: dict[int, CudaGraphReplay | RerunReplay] = {}
            self.first_outputs: dict[int, torch.Tensor] = {}
            self.chain_replays: dict[int, CudaGraphReplay | RerunReplay] = {}
            self.chain_outputs: dict[int, torch.Tensor] = {}
        self.size: int | None = None  # the size the last step ran
        with torch.inference_mode():
            for size in reversed(self.sizes):
                replay = make_replay()
                self.outputs[size] = replay.capture(lambda size=size: self._forward(size))
                self.replays[size] = replay
                if mtp is not None:
                    for replays, outputs, fn in ((self.first_replays, self.first_outputs, self._first_pass),
                                                 (self.chain_replays, self.chain_outputs, self._chained_pass)):
                        replay = make_replay()
                        outputs[size] = replay.capture(lambda size=size, fn=fn: fn(size))
                        replays[size] = replay

    def _batch(self, size: int) -> tuple[ForwardBatch, AttentionPlan]:
        ids, positions, slots, real = self.tokens[:, :size]
        batch = ForwardBatch(ids, positions, slots, list(range(size + 1)), [self.max_model_len] * size,
                             self.block_tables, self.block_size, real_tokens=real)
        rows = DecodeRows(None, self.seq_of_row[:size], self.kv_lens[:size], self.max_model_len)
        batch.plan = AttentionPlan(batch.block_tables, [], rows, [])
        return batch, batch.plan

    def _forward(self, size: int) -> torch.Tensor:
        batch, plan = self._batch(size)
        return self.model(batch, self.cache_layers, plan)

    def _first_pass(self, size: int) -> torch.Tensor:
        batch, _ = self._batch(size)
        return self.mtp(batch, self.outputs[size], self.mtp_cache, self.next_ids[:size])

    def _chained_pass(self, size: int) -> torch.Tensor:
        batch, _ = self._batch(size)
        return self.mtp(batch, self.chain_hidden[:size], self.mtp_cache)

    def size_for(self, chunks: list[SequenceChunk]) -> int | None:
        """The captured size that runs this step, or None when it must run eagerly."""
        width = self.block_tables.shape[1]
        if any(len(c.token_ids) > self.max_query or len(c.block_table) > width for c in chunks):
            return None
        rows = sum(len(c.token_ids) for c in chunks)
        return next((s for s in self.sizes if s >= rows), None)

    def _load(self, chunks: list[SequenceChunk], size: int) -> int:
        """The step's rows into the static inputs (the rows past them set to padding again: a
        bigger step before may have left a request's row there); returns how many."""
        host = ForwardBatch.build(chunks, self.block_size)  # (its positions and slots, on the host)
        n, pad = host.query_start[-1], size - host.query_start[-1]
        seqs = [j for j, c in enumerate(chunks) for _ in c.token_ids]
        padding = torch.tensor([[0] * pad, [0] * pad, [self.scratch_block * self.block_size] * pad, [0] * pad,
                                [self.sizes[-1]] * pad], dtype=torch.long)
        rows = torch.stack([host.input_ids, host.positions, host.slot_mapping, torch.ones(n, dtype=torch.long),
                            torch.tensor(seqs, dtype=torch.long)])
        rows = torch.cat([rows, padding], dim=1)
        self.tokens[:, :size].copy_(rows[:4])
        self.kv_lens[:size].copy_(rows[1] + 1)
        self.seq_of_row[:size].copy_(rows[4])
        tables = host.host_block_tables  # (padded with block 0, past what each row's length reads)
        self.block_tables[: len(chunks), : tables.shape[1]].copy_(tables)
        return n

    def run(self, chunks: list[SequenceChunk], size: int) -> torch.Tensor:
        """The step's hidden states [its tokens, hidden] (what DeepseekV3.forward returns): a view
        of the graph's output, valid until the next replay of that size."""
        n = self._load(chunks, size)
        self.replays[size].replay()
        self.size = size
        return self.outputs[size][:n]

    def run_first_pass(self, next_ids: list[int]) -> torch.Tensor:
        """The MTP layer's first pass over the rows of the step `run` just replayed (whose cache
        entries it writes), next_ids[i] the token after row i's: its output of every row."""
        size = self.size
        n = len(next_ids)
        self.next_ids[:size].copy_(torch.tensor(next_ids + [0] * (size - n)))
        self.first_replays[size].replay()
        return self.first_outputs[size][:n]

    def run_chained_pass(self, chunks: list[SequenceChunk], hidden: torch.Tensor, size: int) -> torch.Tensor:
        """A chained MTP pass: chunks of one draft each, hidden [len(chunks), hidden] the last
        pass's outputs of their rows; its output of each."""
        n = self._load(chunks, size)
        self.chain_hidden[:n].copy_(hidden)
        self.chain_replays[size].replay()
        self.size = None  # (the token buffers no longer hold the main step's rows)
        return self.chain_outputs[size][:n]
