"""MTP drafting on the worker: after a step's verification, the MTP module's first pass writes
its latent entries of every row of the step (in the main model's batch, which keeps its cache
layer complete) and runs the rest of its layer over each drafting request's last verified
position alone (the one row whose output drafts: prompt rows and the rest are only attended
to), then chains from there for up to its drafts.

How many drafts each request proposes is the scheduler's choice (StepPlan.num_drafts and
draft_caps, scheduler/spec_policy.py). A step whose plan asks for none skips the MTP layer: its
positions stay out of that layer's cache, and a later draft reads those entries as they are
(only the drafts' acceptance can suffer, never an output).
"""

from __future__ import annotations

import time

import torch

from engine.decode_graphs import DecodeGraphs
from engine.worker_state import ScheduledWork
from kernels.attention_plan import plan_output_rows
from kernels.forward_batch import ForwardBatch, SequenceChunk
from model.mtp import MTPModule
from scheduler.stop_rules import tokens_left


class MTPProposer:
    def __init__(self, mtp: MTPModule, cache_layer: torch.Tensor, num_spec: int, block_size: int, device: str,
                 max_model_len: int, expert_parallel: bool):
        self.mtp, self.cache_layer, self.num_spec = mtp, cache_layer, num_spec
        self.block_size, self.device, self.max_model_len = block_size, device, max_model_len
        # Every rank runs the step's num_drafts passes (idle ones join the collectives).
        self.expert_parallel = expert_parallel
        self.passes: list[tuple[int, float]] = []  # (rows, seconds) of each pass of the last propose()
        self.graphs: DecodeGraphs | None = None  # the worker's CUDA graphs, where it has them

    def num_drafts(self, w: ScheduledWork, emitted: list[int]) -> int:
        """Its proposal count, or fewer where the request would pass max_tokens or the context with them."""
        r = w.req
        left = tokens_left(r.params.max_tokens, r.num_prompt_tokens, len(r.token_ids) + len(emitted),
                           self.max_model_len)
        return max(0, min(w.propose, self.num_spec, left - 1))

    def propose(self, work: list[ScheduledWork], hidden: torch.Tensor,
                sampled: dict[str, list[int]], passes: int, batch: ForwardBatch | None = None) -> dict[str, list[int]]:
        """Drafts per request that sampled this step; `hidden` the main model's step output over
        `batch` (None: the batch is built again); `passes` the step's draft length (the most any
        request proposes)."""
        self.passes = []
        started = time.perf_counter()
        passes = min(passes, self.num_spec)
        if passes <= 0:
            return {}
        next_ids, last, verified_end = self._first_pass_inputs(work, sampled)
        rows = len(next_ids)
        by_id = {w.req.req_id: w for w in work}
        wanted = {rid: self.num_drafts(by_id[rid], sampled[rid]) for rid, *_ in last}
        keep = [n for n, (rid, *_) in enumerate(last) if wanted[rid] > 0]
        ids = [last[n][0] for n in keep]
        graphs = self.graphs
        picked = [last[n][1] for n in keep]  # the drafting requests' last verified rows
        if batch is None and graphs is not None and graphs.size is not None:  # the step replayed a graph
            h = graphs.run_first_pass(next_ids)[torch.tensor(picked, dtype=torch.long, device=hidden.device)]
        else:
            if batch is None:
                batch = ForwardBatch.build([SequenceChunk(w.tokens, w.req.num_computed, w.req.block_table)
                                            for w in work], self.block_size, self.device)
            device = batch.input_ids.device
            # Every row writes its entry in the module's cache (later drafts attend to them); only
            # the drafting requests' last verified rows go on through the layer.
            out_rows = plan_output_rows(batch, picked, [last[n][2] for n in keep],
                                        [verified_end[last[n][0]] - 1 for n in keep], hidden)
            h = self.mtp(batch, hidden[:rows], self.cache_layer,
                         torch.tensor(next_ids, dtype=torch.long, device=device), out_rows)
        drafts: dict[str, list[int]] = {rid: [] for rid in ids}
        for j in range(passes):
            if ids:
                for rid, t in zip(ids, self.mtp.logits(h).argmax(-1).tolist()):
                    drafts[rid].append(t)
            now = time.perf_counter()  # (the .tolist() above waited for the device)
            self.passes.append((rows, now - started))
            started, rows = now, len(ids)
            if j == passes - 1:
                break
            keep = [n for n, rid in enumerate(ids) if wanted[rid] > j + 1]
            ids = [ids[n] for n in keep]
            if ids:
                # draft j sits at verified_end + 1 + j, so the module reads it at position verified_end + j
                chain = [SequenceChunk([drafts[rid][-1]], verified_end[rid] + j, by_id[rid].req.block_table)
                         for rid in ids]
                h = h[torch.tensor(keep, device=h.device)]
                size = graphs.size_for(chain) if graphs is not None else None
                if size is not None:
                    h = graphs.run_chained_pass(chain, h, size)
                else:
                    h = self.mtp(ForwardBatch.build(chain, self.block_size, self.device), h, self.cache_layer)
            elif self.expert_parallel:
                self.mtp.idle_forward()
            else:
                break
        return drafts

    @staticmethod
    def _first_pass_inputs(work: list[ScheduledWork], sampled: dict[str, list[int]]
                           ) -> tuple[list[int], list[tuple[str, int, int]], dict[str, int]]:
        """What the MTP layer's first pass reads, over every row of the step (in the main
        model's batch, its attention plan too): each row's next token, the (req id, row, sequence)
        of each drafting request's last verified position and where its verified tokens end.

        Row p's input is the token at p + 1: the step's next token, or for a request's last
        verified row the token it just sampled. Rows past that (rejected drafts) write entries
        that nothing reads before the next step writes them again: its first pass covers them
        (they are its positions) before any chained pass attends that far."""
        next_ids: list[int] = []
        last: list[tuple[str, int, int]] = []
        verified_end: dict[str, int] = {}  # cached tokens once this step is folded in
        for seq, w in enumerate(work):  # (each one's rows follow the last one's, as in the batch)
            r = w.req
            tokens = w.tokens
            emitted = sampled.get(r.req_id)
            if emitted is None:  # a prefill chunk: the prompt goes on
                next_ids += tokens[1:]
                next_ids.append(r.token_ids[r.num_computed + w.num_tokens])
                continue
            valid = w.num_known + (len(emitted) - 1 if w.num_drafts else 0)
            row = len(next_ids) + valid - 1
            next_ids += tokens[1:]
            next_ids.append(emitted[-1])
            next_ids[row] = emitted[-1]
            if w.propose > 0:
                last.append((r.req_id, row, seq))
                verified_end[r.req_id] = r.num_computed + valid
        return next_ids, last, verified_end
