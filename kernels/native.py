"""The compiled CPU kernels under one name, for the entry points that choose them (kernels/*.py)
and the tests that pin them: each lives in its operation's module of kernels/cpu/."""

from kernels.cpu import library, prebuild, runs, set_split_threads, split_threads  # noqa: F401
from kernels.cpu.activation import silu_mul  # noqa: F401
from kernels.cpu.decode import choose_impl, choose_num_splits, latent_fp8_gather, paged_mla_decode_cpu  # noqa: F401
from kernels.cpu.experts import EXPERT_STRIP, moe_experts_available, moe_routed  # noqa: F401
from kernels.cpu.gate import moe_gate  # noqa: F401
from kernels.cpu.linear import (  # noqa: F401
    LINEAR_MAX_ROWS,
    LINEAR_STRIP,
    linear,
    linear_available,
    linear_heads,
    linear_max_rows,
    pack_strips,
    unpack_strips,
)
from kernels.cpu.norm import mla_cache_entries, rms_norm, rms_norm_available  # noqa: F401
from kernels.cpu.prefill import prefill_attention, prefill_attention_available  # noqa: F401
