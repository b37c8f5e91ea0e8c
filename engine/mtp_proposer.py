"""MTP drafting on the worker: after a step's verification, the MTP module runs over every
verified position of the requests that draft this step (which keeps their part of its cache
layer complete), then chains from each sampled request's last position for up to its drafts.

How many drafts each request proposes is the scheduler's choice (StepPlan.num_drafts and
draft_caps, scheduler/spec_policy.py); a step whose plan asks for none skips the MTP layer, and a
request that proposes none this step leaves its positions of the step out of the MTP layer's
cache (a later draft of it reads those entries as they are: only its acceptance can suffer)."""

from __future__ import annotations

import time

import torch

from engine.worker_state import ScheduledWork
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

    def num_drafts(self, w: ScheduledWork, emitted: list[int]) -> int:
        """Its proposal count, or fewer where the request would pass max_tokens or the context with them."""
        r = w.req
        left = tokens_left(r.params.max_tokens, r.num_prompt_tokens, len(r.token_ids) + len(emitted),
                           self.max_model_len)
        return max(0, min(w.propose, self.num_spec, left - 1))

    def propose(self, work: list[ScheduledWork], query_start: list[int], hidden: torch.Tensor,
                sampled: dict[str, list[int]], passes: int) -> dict[str, list[int]]:
        """Drafts per request that sampled this step; `hidden` the main model's step output;
        `passes` the step's draft length (the most any request proposes)."""
        self.passes = []
        started = time.perf_counter()
        passes = min(passes, self.num_spec)
        if passes <= 0:
            return {}
        drafting = [i for i, w in enumerate(work) if w.propose > 0]
        if not drafting:
            if self.expert_parallel:
                for _ in range(passes):
                    self.mtp.idle_forward()
            return {}
        h, last, verified_end = self._first_pass(work, drafting, query_start, hidden, sampled)
        rows = h.shape[0]
        by_id = {w.req.req_id: w for w in work}
        wanted = {rid: self.num_drafts(by_id[rid], sampled[rid]) for rid, _ in last}
        keep = [n for n, (rid, _) in enumerate(last) if wanted[rid] > 0]
        ids = [last[n][0] for n in keep]
        if ids:
            h = h[torch.tensor([last[n][1] for n in keep], device=h.device)]
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
                h = self.mtp(ForwardBatch.build(chain, self.block_size, self.device),
                             h[torch.tensor(keep, device=h.device)], self.cache_layer)
            elif self.expert_parallel:
                self.mtp.idle_forward()
            else:
                break
        return drafts

    def _first_pass(self, work: list[ScheduledWork], drafting: list[int], query_start: list[int],
                    hidden: torch.Tensor, sampled: dict[str, list[int]]
                    ) -> tuple[torch.Tensor, list[tuple[str, int]], dict[str, int]]:
        """The MTP layer over every verified position of the drafting requests; returns its
        output, the (req id, row) of each sampling one's last input and where its verified tokens end."""
        chunks, rows = [], []
        last: list[tuple[str, int]] = []  # (req id, row of its last MTP input) for requests that sampled
        verified_end: dict[str, int] = {}  # cached tokens once this step is folded in
        for i in drafting:
            w = work[i]
            r = w.req
            emitted = sampled.get(r.req_id, [])
            valid = w.num_known + (len(emitted) - 1 if w.num_drafts else 0)
            start = r.num_computed
            # position p's input is the token at p + 1: the next known one, or what was just emitted
            nxt = r.token_ids[start + 1 : start + valid + 1]
            nxt += emitted[: valid - len(nxt)]
            chunks.append(SequenceChunk(nxt, start, r.block_table))
            rows += range(query_start[i], query_start[i] + valid)
            if emitted:
                last.append((r.req_id, len(rows) - 1))
                verified_end[r.req_id] = start + valid
        batch = ForwardBatch.build(chunks, self.block_size, self.device)
        h = self.mtp(batch, hidden[torch.tensor(rows, device=hidden.device)], self.cache_layer)
        return h, last, verified_end
