"""Compiled grammars (messages.GrammarPlan) travel frontend -> scheduler -> worker, and a blob can
be hundreds of kB (DeepSeek-V3's vocabulary): each receiver keeps the last N it was sent, and each
sender mirrors its receiver's cache and sends a blob only when the receiver lacks it. Both sides
make the same least-recently-used updates in the same order (one socket, read in order), so the
mirror is exact; a receiver that finds a key missing says so rather than guess.
"""

from __future__ import annotations

from collections import OrderedDict

from engine.messages import GrammarPlan


class PeerGrammars:
    """The sender's side: which keys the receiver holds."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()

    def outgoing(self, plan: GrammarPlan) -> GrammarPlan:
        """The plan as sent: without its blob when the receiver holds its key."""
        keys = self._keys
        if plan.key in keys:
            keys.move_to_end(plan.key)
            return GrammarPlan(plan.key, "", plan.start_after)
        keys[plan.key] = None
        if len(keys) > self.capacity:
            keys.popitem(last=False)
        return plan


class GrammarBlobs:
    """The receiver's side, for one that passes blobs on (the scheduler): requests share one blob
    string per key, so a queue of requests under one schema holds it once."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._blobs: OrderedDict[str, str] = OrderedDict()

    def incoming(self, plan: GrammarPlan) -> GrammarPlan | None:
        """The plan with its blob (this cache's copy); None when it came without one and the key
        is not here (the sender's mirror diverged)."""
        blobs = self._blobs
        blob = blobs.get(plan.key)
        if blob is not None:
            blobs.move_to_end(plan.key)
        elif plan.blob:
            blob = blobs[plan.key] = plan.blob
            if len(blobs) > self.capacity:
                blobs.popitem(last=False)
        else:
            return None
        return GrammarPlan(plan.key, blob, plan.start_after)
