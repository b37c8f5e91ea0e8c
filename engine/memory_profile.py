"""What a step needs beyond the weights and the cache, measured at start-up, and the cache budget
that leaves room for it.

The latent cache takes what the device has left after the weights, so a step's own peak (its
activations, the prefill expansion of long contexts, the sampler's copies of the logits, the
penalties' token history) must be known first, as vLLM profiles a forward before it sizes its KV
cache. Otherwise a long prompt or a large batch that arrives after hours of serving fails with
out-of-memory. The worker runs the largest step the scheduler can plan once, on a scratch cache
of one block (every page of its tables points there), and measures the high-water mark:

- CUDA: the caching allocator's peak (allocated or reserved, whichever rose more);
- Linux hosts: the process's peak resident memory (VmHWM), reset first through /proc/self/clear_refs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import re
from typing import TYPE_CHECKING

import torch

from cache.latent_cache import LatentCache
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from kernels.attention_plan import SHORT_QUERY_MAX
from kernels.forward_batch import ForwardBatch, SequenceChunk
from model.sampler import SampleRow, speculative_sample

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner

GIB = float(1 << 30)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def trim_host_heap() -> None:
    """Hands the freed heap back to the OS (glibc keeps it otherwise, and would hide the next
    measurement's growth, or keep a long-running worker at its peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMeter:
    """Bytes a block of work raised the device's memory above its level at `start()`."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self._base = (0, 0)

    def start(self) -> bool:
        """False where the peak cannot be measured (a host without /proc's reset). Garbage is
        collected and the freed heap returned first: memory freed during the work (a collection
        of an earlier owner's tensors, say) would otherwise lower the level and hide the growth."""
        gc.collect()
        trim_host_heap()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved())
            return True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak resident set starts over from the current one
            self._base = (_status_kib("VmRSS") * 1024, 0)
        except OSError:
            return False
        return True

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return max(torch.cuda.max_memory_allocated() - self._base[0],
                       torch.cuda.max_memory_reserved() - self._base[1], 0)
        return max(_status_kib("VmHWM") * 1024 - self._base[0], 0)


def worst_step_chunks(max_model_len: int, max_num_batched_tokens: int) -> list[tuple[int, int]]:
    """(cached tokens, new tokens) of the chunks of the step that needs the most memory: the full
    token budget, and in one prefill group the longest context there can be (the last chunk of a
    prompt of max_model_len tokens) beside fresh prompts taking the rest of the budget."""
    chunks: list[tuple[int, int]] = []
    left = max_num_batched_tokens
    least_prefill = SHORT_QUERY_MAX + 1  # fewer query tokens take the decode kernels: no expansion
    if max_model_len > least_prefill and left > least_prefill:
        chunks.append((max_model_len - least_prefill, least_prefill))
        left -= least_prefill
    while left > 0:
        n = min(left, max_model_len)
        chunks.append((0, n))
        left -= n
    return chunks


def cuda_cache_budget(total: int, used: int, step_peak: int, utilization: float) -> int:
    """vLLM's gpu_memory_utilization: the engine may hold `utilization` of the device; the cache
    gets that less what is in use (weights, the CUDA context, other processes) and a step's peak."""
    return int(total * utilization) - used - step_peak


def host_cache_budget(available: int, step_peak: int, fraction: float) -> int:
    """A fraction of the host memory left once a step's peak is set aside."""
    return int(max(available - step_peak, 0) * fraction)


def no_room_message(budget_name: str, needed: str, step_peak: int, max_model_len: int,
                    max_num_batched_tokens: int, max_num_seqs: int) -> str:
    return (f"{budget_name} leaves no room for the latent cache: {needed}; a step's activations peak at "
            f"{step_peak / GIB:.2f} GiB (max_model_len={max_model_len}, max_num_batched_tokens="
            f"{max_num_batched_tokens}, max_num_seqs={max_num_seqs}). Lower those, or give more memory")


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_heap() -> None:
    """A forward's activations are megabytes each: by default glibc maps each one fresh and hands
    it back when freed, so every op of every step page-faults its output in again. Serving them
    from a heap that keeps freed memory (up to 1 GiB, returned when idle by trim_host_heap) took a
    2048-token prefill step on the CPU from 324-348 ms to 234-252 ms."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TOP_PAD, 64 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


def available_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


def cache_budget(c: EngineConfig, device: str, max_model_len: int, peak: int) -> int:
    """Bytes for the latent cache: kv_cache_memory when given (on a GPU, checked against what is
    left), else gpu_memory_utilization of a GPU, or kv_cache_memory_fraction of the host's
    available memory, with a step's peak set aside."""
    limits = (max_model_len, c.max_num_batched_tokens, c.max_num_seqs)
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        used = total - free
        in_use = f"{used / GIB:.2f} GiB are in use (weights, CUDA context, other processes)"
        budget = c.kv_cache_memory
        if budget is None:
            budget = cuda_cache_budget(total, used, peak, c.gpu_memory_utilization)
            if budget <= 0:
                raise ValueError(no_room_message(
                    f"gpu_memory_utilization={c.gpu_memory_utilization} of {total / GIB:.1f} GiB", in_use, peak,
                    *limits))
        elif budget + used + peak > total:
            raise ValueError(no_room_message(f"kv_cache_memory={budget} on a {total / GIB:.1f} GiB device", in_use,
                                             peak, *limits))
        return budget
    if c.kv_cache_memory is not None:
        return c.kv_cache_memory
    return host_cache_budget(available_memory(device), peak, c.kv_cache_memory_fraction)


@torch.inference_mode()
def measure_step_peak(runner: ModelRunner, cache_shape: tuple[int, int, int], fp8_cache: bool) -> int:
    """Runs the largest step the scheduler can plan, main model, MTP pass and sampler, on a
    one-block scratch cache; returns the bytes it raised memory by (0 where that cannot be
    measured). Expert-parallel ranks all run it at the same point of their start, so its
    all-to-alls pair up."""
    c, cfg, device = runner.config, runner.cfg, runner.device
    bs = c.block_size
    scratch = LatentCache(cache_shape[0], 1, bs, *cache_shape[1:], runner.dtype, device, fp8_cache)
    layers = [scratch.layer(i) for i in range(cache_shape[0])]
    gen = torch.Generator().manual_seed(0)  # random tokens route like real ones; the global RNG stays as it was
    chunks = []
    for computed, n in worst_step_chunks(runner.max_model_len, c.max_num_batched_tokens):
        tokens = torch.randint(cfg.vocab_size, (n,), generator=gen).tolist()
        chunks.append(SequenceChunk(tokens, computed, [0] * -(-(computed + n) // bs)))
    runner.release_idle_memory()  # buffers sized by earlier forwards would hide the step's growth
    meter = PeakMeter(device)
    measured = meter.start()
    # Every page points at the one scratch block, which the prefill attention would take for a
    # shared prefix and expand once: without host tables it expands every context, as distinct
    # blocks would make it.
    batch = dataclasses.replace(ForwardBatch.build(chunks, bs, device), host_block_tables=None)
    hidden = runner.model(batch, layers)
    if runner.mtp is not None:
        runner.mtp(batch, hidden, layers[runner.mtp.layer_idx])
    # Every row of a full decode batch (with its drafts' rows) sampling the costliest way:
    # penalties, top-k/top-p that the head cannot settle, logprobs.
    k = runner.num_spec
    n = min(c.max_num_seqs * (1 + k), hidden.shape[0])
    params = SamplingParams(temperature=1.0, top_k=cfg.vocab_size, top_p=0.999, repetition_penalty=1.1,
                            frequency_penalty=0.1, logprobs=20, seed=0)
    # A request's rows (its drafts') share its id: the history holds one slot per request.
    rows = [SampleRow(f"memory-profile-{i // (1 + k)}", params, chunks[0].token_ids, 1) for i in range(n)]
    speculative_sample(runner.model.logits(hidden[:n]), rows, [-1] * n, [1] * n, cfg.eos_token_id, c.seed,
                       runner.history)
    peak = meter.peak() if measured else 0
    runner.history.forget([r.req_id for r in rows])
    for moe in runner.moes:
        moe.reset_load()
    del hidden, scratch, layers
    runner.release_idle_memory()
    return peak
