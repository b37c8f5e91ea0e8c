"""Engine settings, fixed when the engine starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scheduler.waiting_queue import POLICIES


def option(default: Any, help: str, flag: str | None = None, choices: tuple | None = None) -> Any:
    """An engine option: its default and its help, the one declaration that LLM(**options) and
    every command's flags (entrypoints/engine_args.py) derive from. `flag` overrides the flag's
    name (`--no-x` for a bool that defaults to True)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


# Bounds of the EPLB options: far past any use (DeepSeek's deployment runs 32 redundant experts
# over 256), small enough that a typo cannot ask for a table of a billion slots.
MAX_REDUNDANT_EXPERTS = 4096
MAX_EPLB_STEPS = 10**9


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    dtype: str = option("bfloat16", "the compute dtype (float32 for exact checks)",
                        choices=("bfloat16", "float32", "float16"))
    block_size: int = option(64, "tokens per block of the paged latent cache")
    max_num_batched_tokens: int = option(2048, "tokens one step computes, prefill chunks and decodes together")
    max_num_seqs: int = option(256, "sequences one step runs")
    scheduling_policy: str = option("fcfs", "priority: requests' priority (lower sooner) orders admission and "
                                    "preemption", choices=POLICIES)
    max_model_len: int | None = option(None, "the longest sequence served, prompt and output (default: the "
                                       "model's context)")
    kv_cache_memory: int | None = option(None, "bytes for the latent cache (default: on a GPU what "
                                         "gpu_memory_utilization of it leaves after the weights and a step's "
                                         "measured peak, vLLM's rule; on a host kv_cache_memory_fraction of the "
                                         "available memory left after a step's peak)")
    gpu_memory_utilization: float = option(0.9, "the share of the GPU's memory the engine may hold (vLLM's)")
    kv_cache_memory_fraction: float = option(0.05, "on a host without kv_cache_memory: the share of available "
                                             "memory the latent cache takes")
    kv_cache_dtype: str = option("auto", "latent cache entries: auto (the model's dtype) or fp8 (e4m3 latents "
                                 "with a power-of-two scale per 128, bf16 rope keys: kernels/latent_fp8.py, 57% "
                                 "of bf16's bytes)", choices=("auto", "fp8"))
    enable_prefix_caching: bool = option(True, "reuse cached blocks of a shared prompt prefix",
                                         flag="--no-prefix-caching")
    kv_offload_memory: int | None = option(None, "bytes of host memory for the prefix cache's host tier: cached "
                                           "blocks the pool evicts are copied there and loaded back on a hit "
                                           "(cache/tiers.py; pinned memory on CUDA; per expert-parallel rank)")
    kv_disk_cache_dir: str | None = option(None, "a directory for the prefix cache's disk tier: every block copied "
                                           "down is also written there, and a restarted engine of the same "
                                           "model finds it (files under a fingerprint of the checkpoint and the "
                                           "cache layout)")
    kv_disk_cache_size: int = option(16 << 30, "bytes the disk tier may hold (per expert-parallel rank); the "
                                     "least recently used block files go first")
    seed: int = option(0, "the engine's seed (requests without a seed of their own sample from it)")
    device: str = option("auto", "auto (cuda when torch sees a GPU), cpu or cuda[:N]")
    num_speculative_tokens: int = option(0, "MTP draft tokens verified per decode step, at most (1-3; 0: no "
                                         "speculative decoding)")
    speculative_draft_policy: str = option("adaptive", "adaptive: the engine picks each step's draft length "
                                           "(0 to num_speculative_tokens) and each request's from measured cost "
                                           "and acceptance (scheduler/spec_policy.py); fixed: always "
                                           "num_speculative_tokens", choices=("adaptive", "fixed"))
    cpu_threads: int = option(0, "a CPU worker's torch threads: 0 (auto): each step of few enough tokens for "
                              "the compiled kernels runs on 1 thread, half or all of the worker's share of the "
                              "cores (OMP_NUM_THREADS, else the cores over the host's workers), whichever its "
                              "size measured fastest (engine/step_threads.py); N: always N")
    async_scheduling: bool = option(True, "plan step N+1 while the worker runs step N",
                                    flag="--no-async-scheduling")
    cuda_graphs: bool = option(False, "replay decode steps from CUDA graphs (engine/decode_graphs.py; the GPU "
                               "kernel path without expert parallelism; with speculative decoding, its "
                               "verification steps and MTP passes too; ignored elsewhere). Off by default "
                               "until timed on a GPU")
    batch_invariant: bool = option(False, "each sequence's tokens the same whatever is batched beside it "
                                   "(kernels/batch_invariant.py; vLLM's VLLM_BATCH_INVARIANT): on the kernel "
                                   "path, dense products in one fixed tiling and decode attention unsplit; "
                                   "slower on a GPU")
    ep_size: int = option(1, "expert parallelism: worker processes, each with its own block pool (data-parallel "
                          "attention) and 1/ep_size of the routed experts; budgets and max_num_seqs are per rank")
    enable_eplb: bool = option(False, "expert-parallel load balancing (engine/eplb.py, docs/eplb.md): each MoE "
                               "layer gets num_redundant_experts extra slots holding replicas of its most loaded "
                               "experts, and the experts are re-placed from the measured load every "
                               "eplb_interval_steps steps while serving (weights move between ranks); needs "
                               "ep_size >= 2")
    num_redundant_experts: int = option(0, "with enable_eplb: extra expert slots per MoE layer, over all ranks "
                                        "(routed experts + these must split evenly over ep_size)")
    eplb_window_steps: int = option(1000, "with enable_eplb: the steps of measured expert load a placement is "
                                    "computed from")
    eplb_interval_steps: int = option(3000, "with enable_eplb: steps between two re-placements")
    eplb_load_file: str | None = option(None, "with enable_eplb: a file of per-layer expert load the engine "
                                        "writes at shutdown and starts its placement from when it exists")
    master_addr: str = option("127.0.0.1", "torch.distributed rendezvous address (torchrun's name)")
    master_port: int = option(0, "rendezvous port (0: the engine picks a free one, one host only)")
    nnodes: int = option(1, "hosts taking part: node 0 runs the frontend, the scheduler and its share of the "
                         "workers; node n runs `mlaserve worker --node-rank n`")
    node_rank: int = option(0, "this host's index; 0 runs the scheduler")
    scheduler_port: int = option(0, "with nnodes > 1: workers reach the scheduler over tcp on master_addr, ports "
                                 "scheduler_port (results) and scheduler_port + 1 + rank (plans)")
    worker_heartbeat_timeout_s: float = option(5.0, "seconds a worker may send no heartbeat (one every half "
                                               "second, from a thread of its own) before the engine fails its "
                                               "requests naming that rank", flag="--worker-heartbeat-timeout")

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' (the model's dtype) or 'fp8', got {self.kv_cache_dtype!r}")
        if self.block_size < 1 or self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("block_size, max_num_batched_tokens and max_num_seqs must be positive")
        if not 0 < self.gpu_memory_utilization <= 1 or not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_utilization ({self.gpu_memory_utilization}) and kv_cache_memory_fraction "
                             f"({self.kv_cache_memory_fraction}) must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must hold a prompt token and a generated one (>= 2), "
                             f"got {self.max_model_len}")
        if not 0 <= self.cpu_threads <= 4096:
            raise ValueError(f"cpu_threads must be 0 (auto) to 4096, got {self.cpu_threads}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if self.kv_offload_memory is not None and self.kv_offload_memory < 0:
            raise ValueError(f"kv_offload_memory must be a number of bytes >= 0, got {self.kv_offload_memory}")
        if self.kv_disk_cache_size < 1:
            raise ValueError(f"kv_disk_cache_size must be a positive number of bytes, got {self.kv_disk_cache_size}")
        if (self.kv_offload_memory or self.kv_disk_cache_dir) and not self.enable_prefix_caching:
            raise ValueError("kv_offload_memory and kv_disk_cache_dir extend the prefix cache: they need "
                             "prefix caching on")
        if self.scheduling_policy not in POLICIES:
            raise ValueError(f"scheduling_policy must be one of {POLICIES}, got {self.scheduling_policy!r}")
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be at least 1, got {self.ep_size}")
        if (self.num_redundant_experts or self.eplb_load_file) and not self.enable_eplb:
            raise ValueError("num_redundant_experts and eplb_load_file are EPLB's: they need enable_eplb")
        if self.enable_eplb and self.ep_size < 2:
            raise ValueError(f"enable_eplb balances experts over expert-parallel ranks: it needs ep_size >= 2, "
                             f"got {self.ep_size}")
        if not 0 <= self.num_redundant_experts <= MAX_REDUNDANT_EXPERTS:
            raise ValueError(f"num_redundant_experts must be in [0, {MAX_REDUNDANT_EXPERTS}], got "
                             f"{self.num_redundant_experts}")
        if not (1 <= self.eplb_window_steps <= MAX_EPLB_STEPS and 1 <= self.eplb_interval_steps <= MAX_EPLB_STEPS):
            raise ValueError(f"eplb_window_steps ({self.eplb_window_steps}) and eplb_interval_steps "
                             f"({self.eplb_interval_steps}) must be in [1, {MAX_EPLB_STEPS}]")
        if self.nnodes < 1 or self.ep_size % self.nnodes or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"ep_size {self.ep_size} must be a multiple of nnodes {self.nnodes}, and node_rank "
                             f"{self.node_rank} in [0, nnodes)")
        if self.nnodes > 1 and not (self.master_port and self.scheduler_port):
            raise ValueError("with nnodes > 1 every host needs the same explicit master_port and scheduler_port")
        if not 1.0 <= self.worker_heartbeat_timeout_s <= 3600.0:
            raise ValueError(f"worker_heartbeat_timeout_s must be in [1, 3600] seconds (heartbeats come every "
                             f"0.5 s), got {self.worker_heartbeat_timeout_s}")
        if not 0 <= self.num_speculative_tokens <= 3:
            raise ValueError(f"num_speculative_tokens must be 0 (off) to 3, got {self.num_speculative_tokens}")
        if self.speculative_draft_policy not in ("adaptive", "fixed"):
            raise ValueError(f"speculative_draft_policy must be 'adaptive' or 'fixed', got "
                             f"{self.speculative_draft_policy!r}")

    @property
    def tiered_prefix_cache(self) -> bool:
        return bool(self.kv_offload_memory or self.kv_disk_cache_dir)

    def served_model_len(self, max_position_embeddings: int) -> int:
        """The context the engine serves: the model's, or a shorter one asked for (less memory for
        a step's prefill expansion). Longer than the model's is refused: its rope tables end there."""
        if self.max_model_len is None:
            return max_position_embeddings
        if self.max_model_len > max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} is longer than the model's context "
                             f"(max_position_embeddings {max_position_embeddings} in {self.model_dir})")
        return self.max_model_len

    @property
    def local_ranks(self) -> range:
        """The expert-parallel ranks whose workers run on this host."""
        per = self.ep_size // self.nnodes
        return range(self.node_rank * per, (self.node_rank + 1) * per)

    def worker_links(self, bind: bool, ipc_dir: str | None = None) -> dict[str, str]:
        """Addresses of the scheduler's worker sockets ("results", "plans{r}"): ipc on one host,
        tcp across hosts (the scheduler binds on every interface; workers connect to master_addr)."""
        names = ["results"] + [f"plans{r}" for r in range(self.ep_size)]
        if self.nnodes == 1:
            return {n: f"ipc://{ipc_dir}/{n}" for n in names}
        host = "*" if bind else self.master_addr
        return {n: f"tcp://{host}:{self.scheduler_port + i}" for i, n in enumerate(names)}
