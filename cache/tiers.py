"""The scheduler's view of one rank's lower tiers of the prefix cache: which block hashes the
worker's host memory and its disk hold, and the copies each step plans between them and the
pool. Pure Python, like the block manager: the worker (cache/tier_store.py) holds the bytes.

- Host tier: `host_blocks` slots, least recently used first out. A cached block that the pool
  evicts is copied into a slot (with a disk tier, already when its last reference goes: the
  block manager records both); the worker copies it before the step that reuses the block runs.
- Disk tier: `disk_blocks` files, LRU too. Every block copied down is also written to disk from
  its slot (write-through), so dropping a host slot later loses nothing. A disk hit is read back
  into a host slot on the worker's I/O thread; its request waits outside the queue until the
  worker reports the read, then loads it like any host hit. A read that fails is a miss.

A host entry is ready (its bytes are valid) or loading (a disk read fills it). An entry that a
request is about to load, or waits for, is pinned: it is never the one reused for another block.
"""

from __future__ import annotations

from collections import OrderedDict

from cache.block_manager import BlockManager, block_hash
from engine.messages import StepPlan, StepResult

Hit = tuple[bytes, tuple[int, ...]]  # a block's hash and tokens


class HostEntry:
    __slots__ = ("slot", "tokens", "ready", "pins")

    def __init__(self, slot: int, tokens: tuple[int, ...], ready: bool):
        self.slot = slot
        self.tokens = tokens
        self.ready = ready
        self.pins = 0


class TierCounters:
    def __init__(self) -> None:
        self.host_hit_tokens = 0  # prompt tokens loaded from host memory
        self.disk_hit_tokens = 0  # prompt tokens read back from disk
        self.blocks_down = 0  # pool -> host copies
        self.blocks_up = 0  # host -> pool copies
        self.blocks_written = 0  # host -> disk files (failed writes taken back)
        self.blocks_read = 0  # disk -> host reads that succeeded
        self.reads_failed = 0
        self.copy_seconds = 0.0  # the worker's time copying between pool and host, on the step's path
        self.load_waits: list[float] = []  # seconds requests waited for disk reads, not yet taken by metrics


class PrefixTiers:
    def __init__(self, host_blocks: int, disk_blocks: int, block_size: int, disk_keys: list[bytes] = ()):
        if disk_blocks and not host_blocks:
            raise ValueError("a disk tier stages its blocks in host memory: it needs host_blocks > 0")
        self.block_size = block_size
        self.host_blocks = host_blocks
        self.disk_blocks = disk_blocks
        self.host: OrderedDict[bytes, HostEntry] = OrderedDict()  # the front is reused first
        self._free_slots = list(range(host_blocks - 1, -1, -1))
        self.disk: OrderedDict[bytes, None] = OrderedDict()
        self._deletes: list[bytes] = []  # files to remove, sent with the next plan
        self._filled: list[HostEntry] = []  # entries copied down this step: pinned until it is planned
        self.counters = TierCounters()
        for key in disk_keys:  # oldest first, as the worker listed them
            self._add_to_disk(key)

    # ---- lookups ---------------------------------------------------------------------------

    def lookup(self, token_ids: list[int], start_block: int, parent: bytes, pool: BlockManager
               ) -> list[tuple[bytes, tuple[int, ...], int | None]]:
        """The blocks after the pool's unbroken hit (block `start_block` on, whose prefix hashes
        to `parent`), as far as the chain goes on in the pool, host memory or disk: (hash,
        tokens, the pool's block or None when it is below). Leaves one prompt token uncached, as
        the pool's lookup does."""
        bs = self.block_size
        found: list[tuple[bytes, tuple[int, ...], int | None]] = []
        host, disk = self.host, self.disk
        for i in range(start_block, (len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = block_hash(parent, tokens)
            block = pool.cached_block(h, tokens)
            if block is None:
                entry = host.get(h)
                if entry is not None:
                    if entry.tokens != tokens:
                        break
                elif h not in disk:
                    break
            found.append((h, tokens, block))
            parent = h
        return found

    def held_blocks(self, chain: list[tuple[bytes, tuple[int, ...]]], pool: BlockManager) -> int:
        """How many leading blocks of a prompt's chain this rank has anywhere (pool, host, disk)."""
        n = 0
        for h, tokens in chain:
            if pool.cached_block(h, tokens) is None and h not in self.host and h not in self.disk:
                break
            n += 1
        return n

    def is_ready(self, h: bytes) -> bool:
        entry = self.host.get(h)
        return entry is not None and entry.ready

    def slot(self, h: bytes) -> int:
        return self.host[h].slot

    def pin(self, keys: list[bytes]) -> None:
        for h in keys:
            self.host[h].pins += 1

    def unpin(self, keys: list[bytes]) -> None:
        for h in keys:
            entry = self.host.get(h)
            if entry is not None:  # (a failed read dropped it)
                entry.pins -= 1

    def touch(self, keys: list[bytes]) -> None:
        for h in keys:
            if h in self.host:
                self.host.move_to_end(h)
            if h in self.disk:
                self.disk.move_to_end(h)

    # ---- copies ----------------------------------------------------------------------------

    def stage_reads(self, hits: list[Hit], plan: StepPlan) -> int:
        """Plans disk reads for the hits that host memory lacks, into slots of their own (marked
        loading). Returns how many of `hits` can be served: all, unless host memory has no
        unpinned slot left for one, where the rest are misses."""
        for n, (h, tokens) in enumerate(hits):
            if h in self.host:
                continue
            slot = self._take_slot()
            if slot is None:
                return n
            self.host[h] = HostEntry(slot, tokens, ready=False)
            plan.read_keys.append(h)
            plan.read_slots.append(slot)
            plan.read_tokens.extend(tokens)
            self.disk.move_to_end(h)
        return len(hits)

    def spill(self, evicted: list[tuple[int, bytes, tuple[int, ...]]], plan: StepPlan) -> None:
        """Plans the copy down of the cached blocks the pool evicted in this step (the worker
        runs it before the step's forward overwrites them), and their disk writes. A slot takes
        one block per step: the worker copies all of them down before any is written to disk."""
        filled = self._filled
        for block, h, tokens in evicted:
            entry = self.host.get(h)
            if entry is not None:  # already below (it was loaded from there)
                self.host.move_to_end(h)
                continue
            slot = self._take_slot()
            if slot is None:
                continue  # every slot is pinned: the block is dropped, as without tiers
            entry = self.host[h] = HostEntry(slot, tokens, ready=True)
            entry.pins += 1
            filled.append(entry)
            plan.offload_blocks.append(block)
            plan.offload_slots.append(slot)
            self.counters.blocks_down += 1
            if self.disk_blocks:
                if h in self.disk:
                    self.disk.move_to_end(h)
                else:
                    plan.write_keys.append(h)
                    plan.write_slots.append(slot)
                    plan.write_tokens.extend(tokens)
                    self.counters.blocks_written += 1
                    self._add_to_disk(h)

    def end_step(self, plan: StepPlan) -> None:
        """The step is planned: its copied-down slots may be reused from the next one on."""
        for entry in self._filled:
            entry.pins -= 1
        self._filled = []
        if self._deletes:
            plan.delete_keys, self._deletes = self._deletes, []

    def _take_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        for h, entry in self.host.items():  # least recently used first; pinned ones are few
            if entry.ready and not entry.pins:
                del self.host[h]
                return entry.slot
        return None

    def _add_to_disk(self, h: bytes) -> None:
        self.disk[h] = None
        while len(self.disk) > self.disk_blocks:
            old, _ = self.disk.popitem(last=False)
            self._deletes.append(old)

    def on_result(self, result: StepResult) -> None:
        """Folds the worker's finished reads and failed writes in. A failed read's entry goes at
        once: whoever pinned it must forget that pin (Scheduler.on_tier_result does)."""
        c = self.counters
        c.copy_seconds += result.tier_copy_seconds
        for h in result.writes_failed:
            self.disk.pop(h, None)
            c.blocks_written -= 1
        for h in result.reads_done:
            entry = self.host.get(h)
            if entry is not None:
                entry.ready = True
            c.blocks_read += 1
        for h in result.reads_failed:  # a missing, corrupt or foreign file: a miss from now on
            entry = self.host.pop(h, None)
            if entry is not None:
                self._free_slots.append(entry.slot)
            self.disk.pop(h, None)
            c.reads_failed += 1

    def check_integrity(self) -> None:
        slots = [e.slot for e in self.host.values()] + self._free_slots
        assert sorted(slots) == list(range(self.host_blocks)), "host slots lost or shared"
        assert all(e.pins >= 0 for e in self.host.values()), "a host entry unpinned more than pinned"
        assert len(self.disk) <= self.disk_blocks
