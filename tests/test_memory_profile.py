"""The start-up measurement of a step's memory (engine/memory_profile.py) and the cache budget
that leaves room for it: the step it runs is the largest the scheduler can plan, the meter sees
what the work allocates, and the measurement leaves the worker as it found it."""

import sys

import pytest
import torch

from engine.config import EngineConfig
from engine.memory_profile import PeakMeter, cuda_cache_budget, host_cache_budget, measure_step_peak, worst_step_chunks
from kernels.attention_plan import SHORT_QUERY_MAX

GIB = 1 << 30


@pytest.mark.parametrize("max_model_len, budget", [(4096, 2048), (256, 2048), (163840, 8192), (9, 5), (100, 4)])
def test_the_measured_step_is_the_largest_the_scheduler_can_plan(max_model_len, budget):
    """Every token of the budget, and the longest context a chunk can have (the last chunk of a
    prompt of max_model_len tokens, long enough to take the expanding prefill path) in the same
    prefill group as the rest (the model's expand limit is max_model_len + the budget)."""
    chunks = worst_step_chunks(max_model_len, budget)
    assert sum(n for _, n in chunks) == budget
    contexts = [computed + n for computed, n in chunks]
    assert max(contexts) <= max_model_len
    assert sum(contexts) <= max_model_len + budget
    if max_model_len > SHORT_QUERY_MAX + 1 and budget > SHORT_QUERY_MAX + 1:
        assert chunks[0] == (max_model_len - SHORT_QUERY_MAX - 1, SHORT_QUERY_MAX + 1)


def test_budgets_leave_room_for_a_step():
    # vLLM's rule: 0.9 of an 80 GiB device, less 40 GiB in use and a 5 GiB step
    assert cuda_cache_budget(80 * GIB, 40 * GIB, 5 * GIB, 0.9) == int(72 * GIB) - 45 * GIB
    assert cuda_cache_budget(80 * GIB, 70 * GIB, 5 * GIB, 0.9) < 0  # the caller refuses to start
    assert host_cache_budget(10 * GIB, 2 * GIB, 0.05) == int(8 * GIB * 0.05)
    assert host_cache_budget(GIB, 2 * GIB, 0.5) == 0


@pytest.mark.parametrize("field, value", [("gpu_memory_utilization", 0.0), ("gpu_memory_utilization", 1.5),
                                          ("kv_cache_memory_fraction", 0.0), ("kv_cache_memory", 0)])
def test_memory_settings_out_of_range_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(model_dir="x", **{field: value})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_the_host_meter_sees_what_work_allocates():
    meter = PeakMeter("cpu")
    assert meter.start()
    held = torch.ones(64 << 20, dtype=torch.uint8)  # touched: resident
    del held
    assert meter.peak() >= 60 << 20
    assert meter.start()  # starts over from what is resident now
    small = torch.ones(1 << 20, dtype=torch.uint8)
    assert meter.peak() < 32 << 20
    del small


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_the_worker_measures_a_step_before_sizing_its_cache_and_leaves_no_trace():
    """A worker whose cache is sized from available memory runs the largest step first (main
    model, MTP pass, sampler with drafts' rows) and sets its peak aside. The peak is at least what
    the prefill expansion and the logits alone must hold; the measurement leaves no request in
    the penalties' history (which keeps one slot per request of a full batch), no routed-token
    counts and the global random state as it was."""
    from engine.model_runner import ModelRunner
    from model.demo_checkpoint import default_model_dir

    max_tokens, max_seqs = 512, 32
    runner = ModelRunner(EngineConfig(model_dir=str(default_model_dir()), dtype="float32",
                                      max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs,
                                      num_speculative_tokens=2))
    cfg = runner.cfg
    context = runner.max_model_len + max_tokens - SHORT_QUERY_MAX - 1  # the measured step's prefill contexts
    expansion = context * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) * 4
    logits = min(max_seqs * 3, max_tokens) * cfg.vocab_size * 4
    assert runner.step_peak_bytes >= expansion + logits, (runner.step_peak_bytes, expansion, logits)
    assert runner.step_peak_bytes < 2 * GIB
    assert len(runner.history) == 0 and runner.history.seen.shape[0] == max_seqs
    assert all(int(m.routed_tokens.sum()) == 0 for m in runner.moes)
    state = torch.random.get_rng_state()
    shape = (cfg.num_cache_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    assert measure_step_peak(runner, shape, False) > 0
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(runner.history) == 0


def test_a_given_host_cache_size_skips_the_measurement(tiny_checkpoint):
    """(A GPU measures whatever the cache size: a given size is checked against what is left.)"""
    from engine.model_runner import ModelRunner

    runner = ModelRunner(EngineConfig(model_dir=str(tiny_checkpoint), dtype="float32", kv_cache_memory=1 << 20,
                                      block_size=16, device="cpu"))
    assert runner.step_peak_bytes == 0
    assert runner.num_blocks == (1 << 20) // (runner.kv_bytes_per_token * 16)
