"""A CPU worker's threads per step (engine/step_threads.py): each step size runs on the count
measured faster for it, the others are tried again now and then, steps past the compiled
kernels' rows run on the worker's share unmeasured, and the count never changes a result."""

import pytest
import torch

from engine.config import EngineConfig
from engine.step_threads import MIN_SAMPLES, RETRY_EVERY, StepThreads
from kernels import cpu_build, native


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield StepThreads(2)
    torch.set_num_threads(before)


def run(chooser: StepThreads, tokens: int, seconds_per_token: dict[int, float], steps: int) -> list[int]:
    counts = []
    for _ in range(steps):
        t = chooser.choose(tokens)
        assert torch.get_num_threads() == t
        counts.append(t)
        chooser.record(seconds_per_token[t] * tokens)
    return counts


def test_each_step_size_runs_on_the_count_measured_faster(threads):
    small = run(threads, 1, {1: 0.5e-3, 2: 0.8e-3}, 200)  # (contention: one thread wins)
    large = run(threads, 60, {1: 40e-6, 2: 25e-6}, 200)  # (two threads win)
    assert small[: 2 * MIN_SAMPLES].count(1) == MIN_SAMPLES  # each count measured first
    assert small[50:].count(1) >= len(small[50:]) - 200 // RETRY_EVERY
    assert large[50:].count(2) >= len(large[50:]) - 200 // RETRY_EVERY
    assert threads.chosen() == {1: 1, 54: 2}


def test_a_count_measured_badly_once_is_tried_again(threads):
    """An outlier must not rule a count out for good: the other one is retried and, measured
    faster, taken."""
    speeds = {1: 0.5e-3, 2: 0.3e-3}
    for t in [1] * MIN_SAMPLES + [2] * MIN_SAMPLES:  # 2 threads' first samples slow (a descheduled thread)
        assert threads.choose(4) == t
        threads.record((speeds[t] if t == 1 else 5e-3) * 4)
    assert threads.choose(4) == 1
    threads.record(speeds[1] * 4)
    counts = run(threads, 4, speeds, 4 * RETRY_EVERY)
    assert counts[-RETRY_EVERY:].count(2) >= RETRY_EVERY - 2


def test_an_unmeasured_step_runs_on_the_share_and_teaches_nothing(threads):
    torch.set_num_threads(1)
    assert threads.choose(4096, measured=False) == 2 and torch.get_num_threads() == 2
    threads.record(1.0)
    assert threads.choose(4096) == 1  # (nothing recorded for that size: its first count is tried)


def test_nonsense_times_are_ignored(threads):
    for bad in (float("nan"), float("inf"), -1.0, 0.0):
        threads.choose(8)
        threads.record(bad)
    assert not any(threads._times.values())


def test_cpu_threads_is_checked():
    with pytest.raises(ValueError, match="cpu_threads"):
        EngineConfig(model_dir="x", cpu_threads=-1)
    with pytest.raises(ValueError, match="cpu_threads"):
        EngineConfig(model_dir="x", cpu_threads=10**6)


@pytest.mark.skipif(cpu_build.variant("decode") is None, reason="no compiled CPU decode kernel on this host")
def test_decode_attention_gives_the_same_output_on_any_thread_count():
    """Its context splits follow the worker's share (split_threads), not the step's count."""
    torch.manual_seed(0)
    heads, rank, rope, page, blocks = 4, 512, 64, 16, 8
    cache = torch.randn(blocks, page, rank + rope).to(torch.bfloat16)
    q_lat = torch.randn(1, heads, rank).to(torch.bfloat16)
    q_pe = torch.randn(1, heads, rope).to(torch.bfloat16)
    table = torch.arange(blocks, dtype=torch.int32)[None]
    args = (q_lat, q_pe, cache, table, torch.zeros(1, dtype=torch.int32), torch.tensor([blocks * page - 3]), 0.1,
            blocks * page)
    before = torch.get_num_threads()
    try:
        native.set_split_threads(2)
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(native.paged_mla_decode_cpu(*args))
        assert native.choose_num_splits(1, blocks * page, page, 2) > 1  # (the case where splits matter)
        assert torch.equal(outs[0], outs[1])
    finally:
        native.set_split_threads(None)
        torch.set_num_threads(before)
