"""`n` completions of one prompt (SamplingParams.n, as vLLM's parallel sampling): the first (the
leader) computes the prompt; the others are held, in no queue, until its full prompt blocks are
in the prefix cache. Then they are queued first, each with a reference on the leader's block that
holds the prompt's tail, which its admission copies (so it computes only the last prompt token).
Pinned tails go back whenever blocks run short: a completion without one computes the tail itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from cache.block_manager import BlockManager
from engine.request import Request, Status


class CompletionGroups:
    def __init__(self, blocks: BlockManager, lookahead: int):
        self.blocks = blocks
        self.lookahead = lookahead  # slots past the scheduled tokens that MTP drafting writes
        self.num_held = 0  # completions waiting for their leader's prompt blocks
        self.pinning: dict[Request, None] = {}  # waiting completions holding a reference on a tail block

    def shareable_blocks(self, req: Request) -> int:
        """Full prompt blocks a prefix hit can give another request with this prompt."""
        return (req.num_prompt_tokens - 1) // self.blocks.block_size - (1 if self.lookahead else 0)

    def prompt_shareable(self, req: Request) -> bool:
        """Whether req has computed its prompt (but for the last token; in steps already planned)
        and its full prompt blocks, all a prefix hit can use, are in the prefix cache."""
        last = req.num_prompt_tokens - 1
        return req.num_computed >= last and len(req.block_hashes) >= last // self.blocks.block_size

    def hold(self, leader: Request, followers: list[Request]) -> bool:
        """Holds `followers` for the leader's blocks; False where there is nothing to share (the
        caller queues them at once)."""
        if not (self.blocks.enable_prefix_caching and self.shareable_blocks(leader) > 0):
            return False
        leader.followers = followers
        for f in followers:
            f.leader = leader
        self.num_held += len(followers)
        return True

    def release(self, leader: Request, waiting) -> None:
        """Queues the held completions first in `waiting`. When the leader's prompt is shareable,
        each also takes a reference on the leader's tail block, for its admission to copy: the
        worker runs plans in order, so the step that computed that tail runs before the copy."""
        followers, leader.followers = leader.followers, []
        last = leader.num_prompt_tokens - 1
        tail = None
        if not self.lookahead and last % self.blocks.block_size and self.prompt_shareable(leader):
            tail = leader.block_table[last // self.blocks.block_size]
        for f in reversed(followers):
            f.leader = None
            if tail is not None:
                self.blocks.acquire([tail])
                f.tail_source = tail
                self.pinning[f] = None
            waiting.appendleft(f)
        self.num_held -= len(followers)

    def leave(self, follower: Request) -> None:
        """A held completion that ends before its leader releases it."""
        follower.leader.followers.remove(follower)
        follower.leader = None
        self.num_held -= 1

    def drop_tail_source(self, req: Request) -> None:
        if req.tail_source is not None:
            self.blocks.release([req.tail_source])
            req.tail_source = None
            self.pinning.pop(req, None)

    def unpin_tails(self) -> None:
        """Blocks are short: the tails kept for waiting completions go back (they will compute
        their prompt's tail instead), so that they never hold the pool hostage."""
        for req in list(self.pinning):
            self.drop_tail_source(req)

    def check_integrity(self, running: Iterable[Request], waiting: Iterable[Request]) -> None:
        running, waiting = list(running), list(waiting)
        assert set(self.pinning) == {r for r in waiting if r.tail_source is not None}, "tail pins miscounted"
        held = [f for r in itertools.chain(running, waiting) for f in r.followers]
        assert len(held) == self.num_held, "held completions miscounted"
        assert all(f.leader is not None and not f.block_table and f.status is Status.WAITING for f in held)
        queued = {id(r) for r in itertools.chain(running, waiting)}
        assert not any(id(f) in queued for f in held), "a held completion is also queued"
