"""Structured outputs on the worker: each constrained request's xgrammar matcher, advanced with
the tokens it emits (the worker knows them first, so asynchronous scheduling needs nothing more),
and the step's token bitmask for the constrained rows only, drafts included: a verification row
is masked as the grammar stands after the drafts before it, which are then rolled back.

Grammars arrive compiled (entrypoints/grammars.py compiles them on a frontend's threads) and are
deserialized once per constraint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

from engine.messages import WORKER_GRAMMARS, GrammarPlan
from model.logit_edits import on_device

log = logging.getLogger("mlaserve.grammar")

# A grammar's matching costs microseconds a token, but an ambiguous one (`x ::= x x | "a"`,
# `(a*)*b`) costs more with every token, and the step waits for it: a request whose grammar work
# passes this in STRIKES steps is failed with an error rather than let it slow everyone's steps.
STEP_LIMIT_S = 0.01
STRIKES = 3


def tokenizer_info(model_dir: str | Path, vocab_size: int, eos_token_id: int | None):
    """xgrammar's view of the checkpoint's tokenizer: what each token id decodes to, over the
    model's vocabulary (its logits' width, which may exceed the tokenizer's), EOS the stop token."""
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(model_dir) / "tokenizer.json"))
    stops = [eos_token_id] if eos_token_id is not None else None
    return xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size, stop_token_ids=stops)


class RequestGrammar:
    """One request's matcher. Before `start_after` appears in the output nothing is constrained."""

    __slots__ = ("matcher", "start_after", "active", "broken", "step_time", "strikes")

    def __init__(self, matcher, start_after: int):
        self.matcher = matcher
        self.start_after = start_after
        self.active = start_after < 0
        self.broken = False  # a token the grammar refused was emitted (the constraints contradicted it)
        self.step_time = 0.0  # seconds of matching in this step
        self.strikes = 0

    def end_step(self) -> str | None:
        """Counts the step's matching time; the error to fail the request with, once it is too slow."""
        slow, self.step_time = self.step_time > STEP_LIMIT_S, 0.0
        if slow and not self.broken:
            self.strikes += 1
            if self.strikes >= STRIKES:
                self.broken = True  # (no more matching time spent on it)
                return (f"structured_outputs: the grammar took over {STEP_LIMIT_S * 1e3:g} ms per token to match "
                        f"{STRIKES} times (an ambiguous grammar's matching grows with the output)")
        return None

    def accept(self, tokens: list[int]) -> None:
        start = time.perf_counter()
        self._accept(tokens)
        self.step_time += time.perf_counter() - start

    def _accept(self, tokens: list[int]) -> None:
        for t in tokens:
            if self.broken or self.matcher.is_terminated():
                return  # (past its end: a token after EOS, sampled before the scheduler saw the EOS)
            if not self.active:
                self.active = t == self.start_after
            elif not self.matcher.accept_token(t):
                # Only when the request's other constraints left the grammar no token (the sampler
                # then falls back to the grammar alone).
                self.broken = True
                log.warning("a constrained output took a token its grammar does not allow; the rest is unconstrained")


class GrammarMasks:
    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_id: int | None):
        self.vocab_size = vocab_size
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._info = None
        # Built beside start-up (a large vocabulary takes a second): the first constrained
        # request joins it.
        self._args = (model_dir, vocab_size, eos_token_id)
        self._loader = threading.Thread(target=self._load_info, name="mlaserve-grammar-vocab", daemon=True)
        self._loader.start()

    def _load_info(self) -> None:
        try:
            self._info = tokenizer_info(*self._args)
        except Exception as e:  # (xgrammar missing, say: a constrained request then fails the step)
            self._info = e

    def request(self, plan: GrammarPlan, output_ids: list[int]) -> RequestGrammar:
        """A matcher for a request new to this worker, advanced past the output it already has
        (a recomputed request)."""
        import xgrammar as xgr

        # The scheduler mirrors these updates (engine/grammar_cache.py: PeerGrammars), so a blob
        # comes exactly when the key is not here. (A matcher keeps its grammar alive past eviction.)
        compiled = self._compiled.get(plan.key)
        if compiled is None:
            if not plan.blob:
                raise RuntimeError("a grammar came without its blob that this worker does not hold "
                                   "(the scheduler's mirror of the worker's grammar cache diverged)")
            self._loader.join()
            if isinstance(self._info, Exception):
                raise RuntimeError(f"structured outputs are unavailable on this worker: {self._info}")
            compiled = xgr.CompiledGrammar.deserialize_json(plan.blob, self._info)
            self._compiled[plan.key] = compiled
            if len(self._compiled) > WORKER_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(plan.key)
        g = RequestGrammar(xgr.GrammarMatcher(compiled), plan.start_after)
        g.accept(output_ids)
        return g

    def bitmask(self, groups: list[tuple[int, RequestGrammar, list[int]]]) -> tuple[list[int], torch.Tensor] | None:
        """groups: (first row, grammar, drafts) per constrained request, whose rows are first row +
        0..len(drafts). Returns the constrained rows and their bitmask (int32 [rows, vocab/32],
        bit t of a row set when token t may come), or None when no row is constrained now."""
        import xgrammar as xgr

        rows: list[int] = []
        masks = xgr.allocate_token_bitmask(sum(len(d) + 1 for _, _, d in groups), self.vocab_size)
        for first, g, drafts in groups:
            if g.broken:
                continue
            start = time.perf_counter()
            matcher = g.matcher
            was_active, taken = g.active, 0
            for j in range(len(drafts) + 1):
                if g.active:
                    if matcher.is_terminated():
                        break
                    matcher.fill_next_token_bitmask(masks, len(rows))
                    rows.append(first + j)
                if j == len(drafts):
                    break
                d = drafts[j]
                if not g.active:
                    g.active = d == g.start_after
                elif matcher.accept_token(d):
                    taken += 1
                else:
                    break  # this draft is masked out, so the rows after it are never used
            if taken:
                matcher.rollback(taken)
            g.active = was_active
            g.step_time += time.perf_counter() - start
        if not rows:
            return None
        return rows, masks[: len(rows)]


_BITS = {}


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Sets the logits of the tokens each row's mask leaves out to -inf, in place."""
    dev = logits.device
    bits = _BITS.get(dev)
    if bits is None:
        bits = _BITS[dev] = torch.arange(32, dtype=torch.int32, device=dev)
    words = bitmask.to(dev, non_blocking=True)
    allowed = ((words[:, :, None] >> bits) & 1).bool().flatten(1)[:, : logits.shape[1]]
    at = on_device(rows, dev)
    logits[at] = logits[at].masked_fill_(~allowed, float("-inf"))
