"""Block manager: exact block ids, reference counts, prefix hits, LRU eviction."""

import pytest

from cache.block_manager import BlockManager


def test_allocate_takes_blocks_in_order_and_release_returns_them():
    bm = BlockManager(num_blocks=4, block_size=2)
    assert bm.allocate(3) == [0, 1, 2]
    assert bm.num_free == 1
    bm.release([0, 1, 2])
    bm.check_integrity([])
    assert bm.num_free == 4


def test_allocating_more_than_available_raises():
    bm = BlockManager(num_blocks=2, block_size=2)
    with pytest.raises(RuntimeError, match="asked for 3 blocks with 2 available"):
        bm.allocate(3)


def test_double_release_is_detected():
    bm = BlockManager(num_blocks=2, block_size=2)
    blocks = bm.allocate(1)
    bm.release(blocks)
    with pytest.raises(RuntimeError, match="released more often"):
        bm.release(blocks)


def test_prefix_hit_reuses_cached_blocks_and_leaves_last_token():
    bm = BlockManager(num_blocks=8, block_size=2)
    tokens = [5, 6, 7, 8, 9]
    table = bm.allocate(3)
    hashes: list[int] = []
    bm.cache_full_blocks(tokens, table, hashes, num_verified=5)
    assert len(hashes) == 2  # two full blocks
    bm.release(table)
    blocks, hit_hashes = bm.lookup_prefix([5, 6, 7, 8, 1])
    assert blocks == table[:2] and hit_hashes == hashes
    # a prompt made only of cached blocks still leaves its last block to compute
    assert bm.lookup_prefix([5, 6, 7, 8])[0] == table[:1]
    bm.acquire(blocks)
    bm.check_integrity([blocks])


def test_different_prefix_same_block_tokens_does_not_hit():
    bm = BlockManager(num_blocks=8, block_size=2)
    table = bm.allocate(2)
    bm.cache_full_blocks([1, 2, 3, 4], table, [], num_verified=4)
    assert bm.lookup_prefix([9, 9, 3, 4, 0])[0] == []


def test_shared_block_counts_both_holders():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = bm.allocate(2)
    bm.cache_full_blocks([1, 2, 3, 4], a, [], num_verified=4)
    hit, _ = bm.lookup_prefix([1, 2, 3, 4, 5])
    bm.acquire(hit)
    b = hit + bm.allocate(1)
    bm.check_integrity([a, b])
    bm.release(a)
    bm.check_integrity([b])
    assert bm.num_free == 8 - 3


def test_eviction_is_lru_and_free_blocks_go_before_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=1)
    old = bm.allocate(1)
    bm.cache_full_blocks([10], old, [], num_verified=1)
    new = bm.allocate(1)
    bm.cache_full_blocks([20], new, [], num_verified=1)
    bm.release(old)
    bm.release(new)
    # two blocks never used, then `old` (released first), then `new`
    assert bm.allocate(2) == [2, 3]
    assert bm.allocate(1) == old  # least recently used cached block is evicted first
    assert bm.lookup_prefix([10, 0])[0] == []
    assert bm.lookup_prefix([20, 0])[0] == new


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=4, block_size=1, enable_prefix_caching=False)
    t = bm.allocate(2)
    bm.cache_full_blocks([1, 2], t, [], num_verified=2)
    bm.release(t)
    assert bm.lookup_prefix([1, 2, 3])[0] == [] and bm.num_cached == 0
