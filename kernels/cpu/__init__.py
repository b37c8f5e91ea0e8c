"""The CPU path's compiled kernels (kernels/csrc), called through ctypes, one module per
operation: decode attention and the FP8 cache gather (decode.py), prefill attention (prefill.py),
the dense linear (linear.py), the routed experts (experts.py), the router (gate.py), RMSNorm and
the MLA cache write (norm.py), SwiGLU's activation (activation.py). Each module declares the C
signatures it calls beside the call, with the argument names of the C source.

kernels/cpu_build.py builds the library per instruction-set variant and says which variant each
kernel family runs (`library(family)`: None where the family's torch implementation runs).
"""

from __future__ import annotations

import ctypes

import torch

from kernels import cpu_build

P, I32, I64, F32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float

_signatures: dict[str, list] = {}


def declare(name: str, **args) -> None:
    """`int name(args...)` as the C source declares it; keyword order is the argument order."""
    _signatures[name] = list(args.values())


@cpu_build.on_load
def _bind(lib: ctypes.CDLL) -> None:
    for name, argtypes in _signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, I32


def library(family: str = "decode") -> ctypes.CDLL | None:
    """The build `family`'s kernels run from (kernels/cpu_build.py: FAMILIES), or None."""
    return cpu_build.family_library(family)


def prebuild() -> None:
    """Builds (or finds built) every library a family will call, so that no step waits on it."""
    for family in cpu_build.FAMILIES:
        library(family)


def runs(family: str, *tensors: torch.Tensor) -> bool:
    """Whether `family`'s compiled kernels take these tensors: bf16 on the host, the family on
    a compiled variant."""
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors) and library(family) is not None


_split_threads: int | None = None


def set_split_threads(threads: int | None) -> None:
    """What `split_threads` answers from now on (None: torch's count)."""
    global _split_threads
    _split_threads = threads


def split_threads() -> int:
    """The threads a kernel sizes work it splits for, where the split changes its result (decode
    attention's context splits): a CPU worker's share of the cores, whatever count its step runs
    on (engine/step_threads.py), so that the count changes a step's time, never its tokens."""
    return _split_threads or torch.get_num_threads()


def ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def require_host(kernel: str, *tensors: torch.Tensor) -> None:
    """The compiled kernels read host memory through raw pointers: anything else is refused."""
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError(f"{kernel} reads host memory: got tensors on {sorted({str(t.device) for t in tensors})}")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def as_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t as [rows, cols] without copying where its leading dims flatten into one row stride."""
    flat = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return flat, flat.stride(0)


# Every operation's signatures are declared before any library can load.
from kernels.cpu import activation, decode, experts, gate, linear, norm, prefill  # noqa: E402, F401
