"""The pool of cache blocks: allocation, reference counts, and the prefix cache.

Every block is in exactly one state:
  held       ref_count > 0, named by that many block tables;
  cached     ref_count == 0, full and hashed: reusable by a prefix hit until evicted;
  free       ref_count == 0, holding nothing of value.
Cached and free blocks share one LRU queue (`_free`): allocation takes from its front, so free
blocks go first (they are put at the front) and cached blocks are evicted least recently used.

A full block's hash chains its tokens with its prefix's hash (block_hash: a keyed digest, the
same in every process and across restarts, so the disk tier can name files by it and no one can
craft a collision as Python's hash() allows); a hit also compares the tokens, so a collision can
never serve wrong cache entries.

With lower tiers (cache/tiers.py) a hashed block that allocation evicts is recorded in `evicted`
for the scheduler to copy down (with a disk tier, one whose last reference goes is recorded at
once: what the disk keeps should not wait for the pool to need the block), and a block loaded back
from a tier is registered as cached.
"""

from __future__ import annotations

import array
import hashlib
from collections import OrderedDict

ROOT_HASH = b""  # the parent of a sequence's first block


def block_hash(parent: bytes, tokens: tuple[int, ...] | list[int]) -> bytes:
    """A full block's key: 16 bytes of BLAKE2b over its prefix's key and its token ids."""
    return hashlib.blake2b(parent + array.array("i", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 record_evictions: bool = False, record_releases: bool = False):
        if num_blocks < 1:
            raise ValueError(f"the cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash: list[bytes | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        # (block, hash, tokens) of cached blocks that allocation reused since the scheduler last
        # took them: what the lower tiers copy down before the step overwrites them.
        self.record_evictions = record_evictions
        self.record_releases = record_releases
        self.evicted: list[tuple[int, bytes, tuple[int, ...]]] = []

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (free plus evictable cached)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def chain(self, token_ids: list[int]) -> list[tuple[bytes, tuple[int, ...]]]:
        """(hash, tokens) of each full block of a prompt but its last token."""
        out: list[tuple[bytes, tuple[int, ...]]] = []
        parent, bs = ROOT_HASH, self.block_size
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            parent = block_hash(parent, tokens)
            out.append((parent, tokens))
        return out

    def lookup_prefix(self, token_ids: list[int]) -> tuple[list[int], list[bytes]]:
        """Cached blocks of the longest cached prefix, and their hashes. At least one token is
        left uncached so the request still computes the logits of its last prompt token."""
        if not self.enable_prefix_caching:
            return [], []
        blocks: list[int] = []
        hashes: list[bytes] = []
        parent = ROOT_HASH
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = block_hash(parent, tokens)
            b = self._by_hash.get(h)
            if b is None or self._tokens[b] != tokens:
                break
            blocks.append(b)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def cached_block(self, h: bytes, tokens: tuple[int, ...]) -> int | None:
        b = self._by_hash.get(h)
        return b if b is not None and self._tokens[b] == tokens else None

    def acquire(self, blocks: list[int]) -> None:
        """Takes a reference on blocks found by lookup_prefix."""
        for b in blocks:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} available")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self._ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drops one reference on each block. Tail blocks are queued first so that a sequence's
        prefix, the part most likely to be shared, is evicted last."""
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] < 0:
                raise RuntimeError(f"block {b} released more often than acquired")
            if self._ref[b] == 0:
                self._free[b] = None
                if self._hash[b] is None:
                    self._free.move_to_end(b, last=False)  # nothing cached in it: reuse first
                elif self.record_releases:
                    self.evicted.append((b, self._hash[b], self._tokens[b]))

    def cache_full_blocks(self, token_ids: list[int], table: list[int], hashes: list[bytes],
                          num_verified: int) -> None:
        """Registers the blocks of `table` that `num_verified` computed tokens fill, extending
        `hashes` (the request's chain) in place. Only verified tokens ever enter the cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(hashes), num_verified // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = block_hash(hashes[-1] if hashes else ROOT_HASH, tokens)
            hashes.append(h)
            self.register(table[i], h, tokens)

    def register(self, b: int, h: bytes, tokens: tuple[int, ...]) -> None:
        """Caches held block b under hash h (a block just filled, or one loaded from a tier)."""
        if h in self._by_hash or self._hash[b] is not None:
            return  # the same content already cached in another block: keep that one
        self._hash[b] = h
        self._tokens[b] = tokens
        self._by_hash[h] = b

    def _evict(self, b: int) -> None:
        h = self._hash[b]
        if h is not None:
            del self._by_hash[h]
            if self.record_evictions:
                self.evicted.append((b, h, self._tokens[b]))
            self._hash[b] = None
            self._tokens[b] = None

    def check_integrity(self, tables: list[list[int]]) -> None:
        """Raises AssertionError unless every block is in exactly one state and every held
        block's reference count equals the number of tables naming it."""
        refs = [0] * self.num_blocks
        for t in tables:
            for b in t:
                refs[b] += 1
        assert refs == self._ref, "reference counts differ from the block tables"
        free = set(self._free)
        assert len(free) == len(self._free)
        assert free == {b for b in range(self.num_blocks) if self._ref[b] == 0}, "free list wrong"
        held = sum(1 for r in self._ref if r > 0)
        assert held + len(free) == self.num_blocks
        assert all(self._hash[b] == h for h, b in self._by_hash.items()), "hash index wrong"
        assert sum(h is not None for h in self._hash) == len(self._by_hash)
