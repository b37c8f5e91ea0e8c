"""Which implementation a kernel entry point runs: the Triton kernel or its torch reference.

Triton runs on CUDA tensors. On the CPU the references run, unless `MLASERVE_KERNELS=triton` (or
`use_triton_kernels(True)`) asks for the kernels, which then need `TRITON_INTERPRET=1`: that is how
the tests run every kernel, and the whole model through them, on machines without a GPU.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from kernels.cpu_build import ENV_BYTES  # (read live: tests set MLASERVE_KERNELS mid-process)

_forced: bool | None = None
_batch_invariant = False


def triton_wanted(t: torch.Tensor) -> bool:
    if _forced is not None:
        return _forced
    if ENV_BYTES is not None:
        raw = ENV_BYTES.get(b"MLASERVE_KERNELS")
        choice = "auto" if raw is None else os.fsdecode(raw)
    else:
        choice = os.environ.get("MLASERVE_KERNELS", "auto")
    if choice == "auto":
        return t.is_cuda
    if choice == "triton":
        return True
    if choice == "torch":
        return False
    raise ValueError(f"MLASERVE_KERNELS={choice!r}: expected auto, triton or torch")


@contextmanager
def use_triton_kernels(enabled: bool):
    global _forced
    previous, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = previous


def batch_invariant() -> bool:
    """Whether the kernel path's products and attention keep each row's bits whatever else is
    batched (kernels/batch_invariant.py); the engine's `batch_invariant` option sets it."""
    return _batch_invariant


@contextmanager
def batch_invariant_mode(enabled: bool = True):
    global _batch_invariant
    previous, _batch_invariant = _batch_invariant, enabled
    try:
        yield
    finally:
        _batch_invariant = previous


def set_batch_invariant(enabled: bool) -> None:
    """For a worker process, once, from its config."""
    global _batch_invariant
    _batch_invariant = enabled


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def interpreting() -> bool:
    """Under TRITON_INTERPRET=1 (Triton 3.9) a bf16 `tl.dot` returns garbage, so kernels upcast
    their bf16 dot operands to float32 there; bf16 products are exact in float32, so the result
    is the one the GPU's bf16 tensor cores give. Its float32 -> e4m3 cast also drops the carry
    when rounding crosses a power of two (124.3 becomes 64, not 128), so the quantization kernel
    rounds onto the e4m3 grid itself there and the cast then only has exact values to convert.
    Its float32 -> bf16 cast truncates (the GPU's rounds to nearest even): kernels that must match
    a torch reference bit for bit round in software (quant.round_to_bf16_grid) on both."""
    return os.environ.get("TRITON_INTERPRET") == "1"
