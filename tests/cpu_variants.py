"""Running a compiled CPU kernel family at each of its variants (kernels/cpu_build.py) on one
machine: an AMX machine tests the AVX-512 and generic builds too, an AVX-512 machine the generic
one. A variant this machine cannot run is skipped, naming what it lacks; the run's summary
(conftest.py) lists what each family ran and skipped."""

from __future__ import annotations

import shutil

import pytest

from kernels import cpu_build

# family -> variant -> "ran" or the reason it was skipped (for the run's summary).
COVERAGE: dict[str, dict[str, str]] = {}


def compiled_kernels() -> bool:
    """The compiled kernels must build wherever there is a compiler (CI has one)."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return False
    assert cpu_build.library("generic") is not None, "kernels/csrc did not build: see kernels.cpu_build's warning"
    return True


def each_variant(family: str):
    """Parametrizes a test over every variant `family` has code for (argument `variant`)."""
    return pytest.mark.parametrize("variant", cpu_build.FAMILIES[family][1])


def why_not_runnable(variant: str) -> str | None:
    if not compiled_kernels():
        return "no C++ compiler"
    if variant not in cpu_build.machine_variants():
        lacking = [f for f in cpu_build.VARIANT_CPU_FLAGS[variant] if f not in cpu_build.cpu_flags()]
        return f"the {variant} variant needs {' '.join(lacking)}, which this CPU lacks"
    if variant not in cpu_build.runnable_variants():
        return (f"the {variant} build does not have its code paths here (the compiler lacks the instructions"
                + (", or the OS did not grant the AMX tiles)" if variant == "amx" else ")"))
    return None


def use_variant(monkeypatch: pytest.MonkeyPatch, family: str, variant: str) -> None:
    """Caps `family` (and nothing else) at `variant`, or skips the test saying why it cannot run."""
    reason = why_not_runnable(variant)
    record = COVERAGE.setdefault(family, {})
    if reason is not None:
        record.setdefault(variant, f"skipped: {reason}")
        pytest.skip(f"{family} {variant}: {reason}")
    monkeypatch.setenv(cpu_build.FAMILIES[family][0], variant)
    assert cpu_build.variant(family) == variant
    record[variant] = "ran"


def summary_lines() -> list[str]:
    return [f"{family:10s} " + "; ".join(f"{v} {state}" for v, state in variants.items())
            for family, variants in sorted(COVERAGE.items())]
