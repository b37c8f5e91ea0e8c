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
- the block tables' width: the longest possible context's.

Graphs need CUDA. Where the Triton kernels run on the CPU (the interpreter, in tests), the same
buffers and padding run with `RerunReplay` in place of a graph: replaying reruns the captured
function. Steps with a prefill chunk, speculative verification or more sequences than the largest
size run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.attention_plan import AttentionPlan, DecodeRows
from kernels.backend import cdiv
from kernels.forward_batch import ForwardBatch, SequenceChunk
from model.deepseek_v3 import DeepseekV3

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
    """The captured decode forwards of one worker's model and their static inputs."""

    def __init__(self, model: DeepseekV3, cache_layers: list[torch.Tensor], block_size: int, max_num_seqs: int,
                 max_model_len: int, scratch_block: int, make_replay: Callable[[], CudaGraphReplay | RerunReplay]):
        self.model = model
        self.cache_layers = cache_layers
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.scratch_block = scratch_block
        self.sizes = capture_sizes(max_num_seqs)
        device = model.embed_tokens.device
        most = self.sizes[-1]
        # Per row: token id, position, cache slot, counted in the routing metric (1) or not (0).
        # Every row starts as padding: token 0 at position 0, its entry in the scratch block's
        # first slot, one cached token to attend to (its own), not counted.
        self.tokens = torch.zeros(4, most, dtype=torch.long, device=device)
        self.tokens[2] = scratch_block * block_size
        self.kv_lens = torch.ones(most, dtype=torch.int32, device=device)
        self.seq_of_row = torch.arange(most, dtype=torch.int32, device=device)
        self.block_tables = torch.full((most, cdiv(max_model_len, block_size)), scratch_block, dtype=torch.long,
                                       device=device)
        self.replays: dict[int, CudaGraphReplay | RerunReplay] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            for size in reversed(self.sizes):
                replay = make_replay()
                self.outputs[size] = replay.capture(lambda size=size: self._forward(size))
                self.replays[size] = replay

    def _forward(self, size: int) -> torch.Tensor:
        ids, positions, slots, real = self.tokens[:, :size]
        batch = ForwardBatch(ids, positions, slots, list(range(size + 1)), [self.max_model_len] * size,
                             self.block_tables[:size], self.block_size, real_tokens=real)
        rows = DecodeRows(None, self.seq_of_row[:size], self.kv_lens[:size], self.max_model_len)
        plan = AttentionPlan(batch.block_tables, [], rows, [])
        return self.model(batch, self.cache_layers, plan)

    def size_for(self, chunks: list[SequenceChunk]) -> int | None:
        """The captured size that runs this step, or None when it must run eagerly."""
        width = self.block_tables.shape[1]
        if len(chunks) > self.sizes[-1] or any(len(c.token_ids) != 1 or len(c.block_table) > width
                                               for c in chunks):
            return None
        return next(s for s in self.sizes if s >= len(chunks))

    def run(self, chunks: list[SequenceChunk], size: int) -> torch.Tensor:
        """The step's hidden states [len(chunks), hidden] (what DeepseekV3.forward returns): a view
        of the graph's output, valid until the next replay. Rows past the step's sequences are
        set to padding again: a bigger step before may have left a request's row there."""
        n, page, pad = len(chunks), self.block_size, size - len(chunks)
        scratch = self.scratch_block
        positions = [c.num_computed for c in chunks]
        slots = [c.block_table[p // page] * page + p % page for c, p in zip(chunks, positions)]
        host = torch.tensor([[c.token_ids[0] for c in chunks] + [0] * pad, positions + [0] * pad,
                             slots + [scratch * page] * pad, [1] * n + [0] * pad])
        width = max(len(c.block_table) for c in chunks)
        tables = torch.tensor([c.block_table + [scratch] * (width - len(c.block_table)) for c in chunks]
                              + [[scratch] * width] * pad)
        self.tokens[:, :size].copy_(host)
        self.kv_lens[:size].copy_(host[1] + 1)
        self.block_tables[:size, :width].copy_(tables)
        self.replays[size].replay()
        return self.outputs[size][:n]
