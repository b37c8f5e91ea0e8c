"""Which compiled CPU code runs: the library's builds per instruction-set variant, and each kernel
family's variant.

The library (kernels/csrc) is built with the machine's C++ compiler for the machine's own
instruction set (-march=native), and also for each lesser variant the machine can run, with the
higher instructions turned off, so an AMX machine runs exactly the code an AVX-512 machine (AMD
Zen 4/5, Intel Ice Lake) or an AVX2 machine would compile for itself:

    generic  portable loops, vectorized by the compiler (AVX2 on x86 where the CPU has it)
    avx512   + the AVX-512 BF16 code paths (vector bf16 dot products)
    amx      + the AMX code paths (bf16 matrix tiles)

Builds land in a cache folder keyed by the source, the flags, the compiler and the CPU, so a
process after the first loads one in milliseconds. Each shares torch's OpenMP runtime (same
soname), so its threads are torch's threads.

Every kernel family has a cap, MLASERVE_CPU_<FAMILY> = off (or 0) | generic | avx512 | amx, and
MLASERVE_CPU_ISA caps them all: a family runs the best variant under its caps that the machine has
and the family has code for, else its torch implementation. MLASERVE_NATIVE=0, or no compiler,
leaves every family on torch. Tests cap a family to run each of its variants on one machine.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / name for name in ("mla_decode_cpu.cpp", "prefill_attention_cpu.cpp", "moe_cpu.cpp",
                                    "moe_gate_cpu.cpp", "rms_norm_cpu.cpp", "cache_write_cpu.cpp", "activation_cpu.cpp",
                                    "linear_cpu.cpp")]
HEADERS = [CSRC / "cpu_common.h", CSRC / "rms_norm_row.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

VARIANTS = ("generic", "avx512", "amx")  # lowest first
# The decode kernel's implementation ids; a build's capability mask (mla_decode_impls in
# mla_decode_cpu.cpp) has bit 1 for AVX-512 BF16 and bit 2 for AMX (granted by the OS).
VARIANT_ID = {"generic": 0, "avx512": 1, "amx": 2}
_NO_AMX = ["-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"]
# What each variant's build turns off of -march=native (x86 only: elsewhere there is one build).
VARIANT_FLAGS = {"generic": ["-mno-avx512f", *_NO_AMX], "avx512": _NO_AMX, "amx": []}
# The CPU flags (/proc/cpuinfo) a variant's code needs.
VARIANT_CPU_FLAGS = {"generic": (), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
                     "amx": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16")}

# family -> (its cap, the variants it has code for, what it is). "generic" for the families
# whose loops the compiler vectorizes: their avx512 and amx builds differ only in flags.
FAMILIES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "decode": ("MLASERVE_CPU_DECODE", VARIANTS, "paged MLA decode attention, FP8 cache gather"),
    "norm": ("MLASERVE_CPU_NORM", VARIANTS, "RMSNorm, MLA cache entries and rope"),
    "activation": ("MLASERVE_CPU_ACTIVATION", VARIANTS, "SwiGLU's silu(gate) * up"),
    "gate": ("MLASERVE_CPU_GATE", VARIANTS, "the MoE router's linear and expert selection"),
    "moe": ("MLASERVE_CPU_MOE", ("avx512", "amx"), "routed experts"),
    "linear": ("MLASERVE_CPU_LINEAR", ("avx512", "amx"), "dense bf16 linears and MLA's absorbed products"),
    "prefill": ("MLASERVE_CPU_PREFILL", ("avx512", "amx"), "prefill attention"),
}
# Variants a family runs only when its cap names them: measured slower than torch's path. The
# avx512 prefill kernel ran at 0.39-0.89x torch's attention on a Sapphire Rapids with AMX off
# (benchmarks/cpu_avx512_paths.py --only prefill), though torch's attention kept its AMX there
# (it ignores ONEDNN_MAX_CPU_ISA); on Zen 4 it is unmeasured, so torch stays the default.
OPT_IN: dict[str, tuple[str, ...]] = {"prefill": ("avx512",)}


def cache_dir() -> Path:
    """$MLASERVE_CACHE_DIR/native, else ~/.cache/mlaserve/native, else (home not writable) the
    temporary folder's mlaserve-native."""
    root = os.environ.get("MLASERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mlaserve")
    path = Path(root) / "native"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "mlaserve-native"


@cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def machine_variants() -> list[str]:
    """The variants this CPU has the instructions for (AMX also needs the OS's grant, which only
    a built library can ask for: see `runnable_variants`)."""
    if not _x86():
        return ["generic"]
    return [v for v in VARIANTS if all(f in cpu_flags() for f in VARIANT_CPU_FLAGS[v])]


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _flags(variant: str) -> list[str]:
    return FLAGS + (VARIANT_FLAGS[variant] if _x86() else [])


def _build(cxx: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes starting together never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cxx, *flags, *map(str, SOURCES), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_binders: list[Callable[[ctypes.CDLL], None]] = []


def on_load(bind: Callable[[ctypes.CDLL], None]) -> Callable[[ctypes.CDLL], None]:
    """Registers the function that declares the library's signatures (kernels/cpu/__init__.py)."""
    _binders.append(bind)
    return bind


@cache
def library(variant: str) -> ctypes.CDLL | None:
    """The library built for `variant` (built on first use), or None: MLASERVE_NATIVE=0, no
    compiler, a failed build, or a variant this CPU does not have."""
    if os.environ.get("MLASERVE_NATIVE", "1") == "0" or variant not in machine_variants():
        return None
    cxx = _compiler()
    if cxx is None:
        log.warning("no C++ compiler found: the CPU path uses its torch kernels (slower)")
        return None
    flags = _flags(variant)
    try:
        version = subprocess.run([cxx, "--version"], check=True, capture_output=True, text=True).stdout
        texts = [f.read_text() for f in SOURCES + HEADERS]
        key = hashlib.sha256("\0".join([*texts, " ".join(flags), version, " ".join(sorted(cpu_flags()))]).encode())
        target = cache_dir() / f"mlaserve_cpu-{variant}-{key.hexdigest()[:16]}.so"
        if not target.exists():
            _build(cxx, flags, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("building the CPU kernels (%s) failed, the CPU path uses its torch kernels (slower): %s",
                    variant, detail.strip()[-2000:])
        return None
    for bind in _binders:
        bind(lib)
    return lib


@cache
def runnable_variants() -> tuple[str, ...]:
    """The variants whose build loads here and has its code paths: the compiler knew the
    instructions and, for AMX, the OS granted the tile registers. Asked on every kernel call
    (through `variant`), so found once per process."""
    out = []
    for v in VARIANTS:
        lib = library(v)
        if lib is not None and (v == "generic" or lib.mla_decode_impls() & VARIANT_ID[v]):
            out.append(v)
    return tuple(out)


def _cap(name: str) -> int:
    """The highest variant index the variable allows: off or 0 -> -1, unset -> all."""
    value = os.environ.get(name)
    if value is None or value == "" or value == "1":
        return len(VARIANTS) - 1
    if value in ("0", "off"):
        return -1
    if value not in VARIANTS:
        raise ValueError(f"{name}={value!r}: expected off, {', '.join(VARIANTS)}")
    return VARIANTS.index(value)


# os.environ's own mapping (bytes on POSIX): a kernel call reads two variables, ~80 calls a
# forward, and os.environ.get costs 20 times a dict lookup; reading them live keeps a variable
# set mid-process (tests capping a family) in force at the next call.
ENV_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None
_variant_memo: dict[tuple, str | None] = {}
_CAP_KEYS = {family: cap.encode() for family, (cap, _, _) in FAMILIES.items()}


def variant(family: str) -> str | None:
    """The variant `family` runs now: the best under MLASERVE_CPU_ISA and its own cap that this
    machine runs and the family has code for; None where its torch implementation runs."""
    cap_name = FAMILIES[family][0]
    have = runnable_variants()  # (part of the key: tests rebuild it with other libraries)
    if ENV_BYTES is not None:
        key = (family, have, ENV_BYTES.get(b"MLASERVE_CPU_ISA"), ENV_BYTES.get(_CAP_KEYS[family]))
    else:
        key = (family, have, os.environ.get("MLASERVE_CPU_ISA"), os.environ.get(cap_name))
    try:
        return _variant_memo[key]
    except KeyError:
        pass
    v = _variant_memo[key] = _find_variant(family)
    return v


def _find_variant(family: str) -> str | None:
    cap_name, compiled, _ = FAMILIES[family]
    cap = min(_cap("MLASERVE_CPU_ISA"), _cap(cap_name))
    if cap < 0:
        return None
    have = runnable_variants()
    best = max((VARIANTS.index(v) for v in have if VARIANTS.index(v) <= cap), default=-1)
    if best < 0 or VARIANTS[best] not in compiled:
        return None
    if VARIANTS[best] in OPT_IN.get(family, ()) and os.environ.get(cap_name) != VARIANTS[best]:
        return None
    return VARIANTS[best]


def family_library(family: str) -> ctypes.CDLL | None:
    v = variant(family)
    return library(v) if v is not None else None


def describe() -> str:
    """What a log shows of the machine: its CPU's relevant features, and each family's variant
    and the variants this machine can test for it."""
    relevant = sorted({f for v in VARIANT_CPU_FLAGS.values() for f in v} | {"avx2", "fma", "amx_int8"})
    have = runnable_variants()
    lines = [f"CPU: {platform.processor() or platform.machine()}; "
             f"features: {' '.join(f for f in relevant if f in cpu_flags()) or 'none of ' + ' '.join(relevant)}",
             f"CPU kernel variants runnable here: {', '.join(have) or 'none (no compiler or MLASERVE_NATIVE=0)'}"]
    for family, (cap, compiled, what) in FAMILIES.items():
        testable = [v for v in compiled if v in have]
        opt_in = "".join(f"; {v} only with {cap}={v}" for v in OPT_IN.get(family, ()))
        lines.append(f"  {family:10s} runs {variant(family) or 'torch':7s} tested here: "
                     f"{', '.join(testable) or 'none'} (has code for {', '.join(compiled)}; {cap}{opt_in}) - {what}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
