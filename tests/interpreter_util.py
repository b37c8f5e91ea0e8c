"""Test support for Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import contextlib

import numpy as np


@contextlib.contextmanager
def row_invariant_interpreter_dot():
    """Under the interpreter `tl.dot` is numpy's matmul, and OpenBLAS rounds a row by where it
    sits in the tile on some cores (its Zen and Haswell kernels, not its SkylakeX ones): a row's
    bits change with the rows beside it, as a GPU's tile rows never do. The batch-invariant
    kernels' tests need the GPU's property: within this context the interpreter's dot runs in
    float64, rounded once to its accumulator's dtype, so every row's bits are its own whatever
    core OpenBLAS picked. (Not everywhere: other tests compare the interpreter's float32
    products with torch's, which this would move further apart.)"""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (a.dtype.is_floating() and b.dtype.is_floating()):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        a_data, b_data = a.data, b.data
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:  # FP8: via float16, as Triton does
            a_data = interpreter._convert_float(a_data, a.dtype, tl.float16, None).view(np.float16)
            b_data = interpreter._convert_float(b_data, b.dtype, tl.float16, None).view(np.float16)
        exact = np.matmul(a_data.astype(np.float64), b_data.astype(np.float64)) + d.data
        return interpreter.TensorHandle(exact.astype(d.data.dtype), d.dtype.scalar)

    builder.create_dot = create_dot
    try:
        yield
    finally:
        builder.create_dot = original
