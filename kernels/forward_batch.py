"""One step's input: a flat run of tokens from many sequences, with where each token's cache goes.

Sequence i contributes tokens [query_start[i], query_start[i+1]) of the flat batch; they sit at
positions [context_lens[i] - q_len_i, context_lens[i]), i.e. after the sequence's cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Batches of at most this many tokens a sequence on average compute positions and slots in Python.
SHORT_QUERY_TOKENS = 8


@dataclass(frozen=True)
class SequenceChunk:
    token_ids: list[int]  # tokens to compute this step
    num_computed: int  # tokens of this sequence already in the cache
    block_table: list[int]  # physical blocks, covering at least num_computed + len(token_ids)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset
    query_start: list[int]  # [B + 1], host side
    context_lens: list[int]  # [B], host side: cached tokens after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    block_size: int
    # [T] int64: 1 for a request's token, 0 for a row that only pads the batch to a captured CUDA
    # graph's size (engine/decode_graphs.py); None: every token is a request's.
    real_tokens: torch.Tensor | None = None
    # block_tables in host memory (None where the batch was not built from chunks): the attention
    # plan reads it without waiting on the device.
    host_block_tables: torch.Tensor | None = None
    plan: object = None  # its attention plan, once made (DeepseekV3.plan)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @classmethod
    def build(cls, chunks: list[SequenceChunk], block_size: int, device: str | torch.device = "cpu"):
        if not chunks:
            raise ValueError("a forward batch needs at least one sequence")
        q_lens = [len(c.token_ids) for c in chunks]
        if min(q_lens) < 1:
            raise ValueError("every sequence in a forward batch needs at least one token")
        query_start = [0]
        for n in q_lens:
            query_start.append(query_start[-1] + n)
        context_lens = [c.num_computed + n for c, n in zip(chunks, q_lens)]
        max_blocks = max(len(c.block_table) for c in chunks)
        for c, ctx in zip(chunks, context_lens):
            if len(c.block_table) * block_size < ctx:
                raise ValueError(f"block table of {len(c.block_table)} blocks cannot hold {ctx} tokens")
        # One tensor from padded lists, not a torch.tensor call per sequence: building a batch of 256
        # decode sequences took 2.6 ms that way, 1.0 ms this way.
        tables = torch.tensor([c.block_table + [0] * (max_blocks - len(c.block_table)) for c in chunks],
                              dtype=torch.long)
        if query_start[-1] <= SHORT_QUERY_TOKENS * len(chunks):
            # Positions and slots in Python: for short queries (decodes, verifications, MTP
            # drafting passes) a dozen small torch ops cost more than the lists (22 against
            # 60 us for one decode, 0.70 against 0.83 ms for 256 verifications of 2 drafts;
            # 0.27 against 0.13 ms for 4 prefill chunks of 256).
            pos, slot = [], []
            for c, n in zip(chunks, q_lens):
                table, start = c.block_table, c.num_computed
                for p in range(start, start + n):
                    pos.append(p)
                    slot.append(table[p // block_size] * block_size + p % block_size)
            positions, slots = torch.tensor(pos, dtype=torch.long), torch.tensor(slot, dtype=torch.long)
        else:
            seq_of_token = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(q_lens))
            start_of_seq = torch.tensor([c.num_computed - s for c, s in zip(chunks, query_start[:-1])])
            positions = torch.arange(query_start[-1]) + start_of_seq[seq_of_token]
            slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
        ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)
        return cls(
            input_ids=ids.to(device),
            positions=positions.to(device),
            slot_mapping=slots.to(device),
            query_start=query_start,
            context_lens=context_lens,
            block_tables=tables.to(device),
            block_size=block_size,
            host_block_tables=tables,
        )
