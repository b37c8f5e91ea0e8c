"""The worker's side of the prefix cache's tiers (cache/tier_store.py): copies between the latent
cache and host slots, block files on disk and what makes one valid."""

import errno
import os
import threading

import pytest
import torch

from cache.latent_cache import LatentCache
from cache.tier_store import TierStore, cache_fingerprint
from engine.messages import StepPlan, StepResult
from model.checkpoint_maker import make_checkpoint

BS = 4
FINGERPRINT = bytes(range(16))


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the copy stream's path)")


def store(tmp_path, host=4, dtype=torch.bfloat16, fp8=False, disk=True, fingerprint=FINGERPRINT, device="cpu"):
    cache = LatentCache(3, 8, BS, 512, 64, dtype, device=device, fp8=fp8)
    if fp8:
        cache.data.copy_(torch.randint(0, 256, cache.data.shape, dtype=torch.uint8))
    else:
        cache.data.normal_()
    return TierStore(cache, host, str(tmp_path) if disk else None, 1 << 30, fingerprint, rank=0)


def settle(s: TierStore) -> StepResult:
    """Waits for the I/O thread's queue to drain; what it reported."""
    s._reads.submit(lambda: None).result()
    s._io.submit(lambda: None).result()
    result = StepResult(0)
    s.report(result)
    return result


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype,fp8", [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)])
def test_a_block_goes_down_to_host_and_disk_and_comes_back_bit_equal(tmp_path, dtype, fp8, device):
    s = store(tmp_path, dtype=dtype, fp8=fp8, device=device)
    original = s.cache.data[:, 2].clone()
    s.apply(StepPlan(1, offload_blocks=[2], offload_slots=[1], write_keys=[key(7)], write_slots=[1],
                     write_tokens=[5, 6, 7, 8]))
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(s.host[1], original.cpu())
    assert settle(s).writes_failed == []
    # The slot is reused; the block comes back from disk into another slot, then into block 5.
    s.apply(StepPlan(2, read_keys=[key(7)], read_slots=[3], read_tokens=[5, 6, 7, 8]))
    assert settle(s).reads_done == [key(7)]
    s.apply(StepPlan(3, load_slots=[3], load_blocks=[5]))
    assert torch.equal(s.cache.data[:, 5], original)
    s.close()
    again = store(tmp_path, dtype=dtype, fp8=fp8, device=device)  # a restart lists what is on disk
    assert again.existing_blocks() == [key(7)]
    again.close()


def test_a_read_fails_on_other_tokens_a_bad_file_or_another_fingerprint(tmp_path):
    s = store(tmp_path)
    s.apply(StepPlan(1, offload_blocks=[0, 1], offload_slots=[0, 1], write_keys=[key(1), key(2)], write_slots=[0, 1],
                     write_tokens=[1, 2, 3, 4, 5, 6, 7, 8]))
    settle(s)
    s.apply(StepPlan(2, read_keys=[key(1), key(3)], read_slots=[2, 3], read_tokens=[1, 2, 3, 9, 0, 0, 0, 0]))
    result = settle(s)
    assert result.reads_failed == [key(1), key(3)] and result.reads_done == []  # other tokens; no file
    s.close()
    other = store(tmp_path, fingerprint=bytes(16))
    assert other.existing_blocks() == []  # another model's files are in another directory
    other.close()


def test_a_full_disk_stops_writes_until_a_file_is_removed(tmp_path, monkeypatch, caplog):
    s = store(tmp_path)

    def write(step, k):
        s.apply(StepPlan(step, offload_blocks=[0], offload_slots=[0], write_keys=[key(k)], write_slots=[0],
                         write_tokens=[1, 2, 3, 4]))
        return settle(s).writes_failed
    assert write(1, 9) == []
    real_replace = os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", full)
    assert write(2, 1) == [key(1)]
    assert "disk is full" in caplog.text and not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert write(3, 2) == [key(2)]  # marked full: not tried again
    s.apply(StepPlan(4, delete_keys=[key(9)]))  # room again
    assert write(5, 3) == []
    assert s.existing_blocks() == [key(3)]
    s.close()


def test_a_slow_disk_loses_queued_writes_instead_of_stalling_the_step(tmp_path):
    s = store(tmp_path, host=2)
    gate = threading.Event()
    s._io.submit(gate.wait)  # the I/O thread is busy
    s.apply(StepPlan(1, offload_blocks=[0], offload_slots=[0], write_keys=[key(1)], write_slots=[0],
                     write_tokens=[1, 2, 3, 4]))
    s.apply(StepPlan(2, offload_blocks=[1], offload_slots=[0]))  # slot 0 again, its write still queued
    assert torch.equal(s.host[0], s.cache.data[:, 1])
    gate.set()
    assert settle(s).writes_failed == [key(1)]
    assert not list(tmp_path.rglob("*.kvb"))
    s.close()


def test_the_fingerprint_names_weights_dtype_layout_and_the_layers_cached(tmp_path):
    a = make_checkpoint("tiny", seed=0, out_dir=tmp_path / "a")
    b = make_checkpoint("tiny", seed=1, out_dir=tmp_path / "b")
    base = cache_fingerprint(str(a), torch.float32, False, 16, 4)
    assert base == cache_fingerprint(str(a), torch.float32, False, 16, 4)
    assert len({base, cache_fingerprint(str(b), torch.float32, False, 16, 4),
                cache_fingerprint(str(a), torch.bfloat16, False, 16, 4),
                cache_fingerprint(str(a), torch.float32, True, 16, 4),
                cache_fingerprint(str(a), torch.float32, False, 64, 4),
                cache_fingerprint(str(a), torch.float32, False, 16, 3)}) == 6
