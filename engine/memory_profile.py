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
import gc
import re

import torch

from kernels.mla_attention import SHORT_QUERY_MAX

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
