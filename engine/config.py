"""Engine settings, fixed when the engine starts."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.waiting_queue import POLICIES


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    dtype: str = "bfloat16"  # CPU compute dtype; "float32" for exact checks
    block_size: int = 64
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    # "fcfs", or "priority": requests' `priority` (lower sooner) orders admission and preemption.
    scheduling_policy: str = "fcfs"
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    # Bytes for the latent cache. None: on a GPU, what gpu_memory_utilization of it leaves after the
    # weights and a step's measured peak (vLLM's rule); on a host, kv_cache_memory_fraction of the
    # available memory left after a step's peak.
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_fraction: float = 0.05
    # "auto": entries in the model's dtype; "fp8": kernels/latent_fp8.py's layout, 57% of bf16's bytes.
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    seed: int = 0
    device: str = "auto"  # the worker picks cuda when torch sees a GPU, else cpu
    num_speculative_tokens: int = 0  # MTP drafts per decode step (1-3); 0: no speculative decoding
    # Plan step N+1 while the worker runs step N (off with speculative decoding, whose next plan
    # needs this step's drafts).
    async_scheduling: bool = True
    # Decode steps replayed from CUDA graphs (engine/decode_graphs.py). Off by default until timed
    # on a GPU; applies on the GPU kernel path without expert parallelism or speculative decoding,
    # and is ignored elsewhere.
    cuda_graphs: bool = False
    # Every sequence's tokens the same whatever is batched beside it (kernels/batch_invariant.py;
    # vLLM's VLLM_BATCH_INVARIANT, SGLang's --enable-deterministic-inference): on the kernel path,
    # dense products in one fixed tiling and decode attention unsplit. Costs speed on a GPU.
    batch_invariant: bool = False
    # Expert parallelism: ep_size worker processes, each with its own block pool (data-parallel
    # attention) and 1/ep_size of the routed experts. Budgets and max_num_seqs are per rank.
    ep_size: int = 1
    master_addr: str = "127.0.0.1"  # torch.distributed rendezvous (torchrun's names)
    master_port: int = 0  # 0: the engine picks a free port (one host only)
    # Several hosts: node 0 runs the frontend, the scheduler and its share of the workers; node n
    # runs `mlaserve worker --node-rank n`, whose workers reach the scheduler over ZeroMQ tcp on
    # master_addr, ports scheduler_port (results) and scheduler_port + 1 + rank (plans).
    nnodes: int = 1
    node_rank: int = 0
    scheduler_port: int = 0
    # The watchdog: a worker sends a heartbeat every half second from a thread of its own, also in
    # the middle of a long step (torch's kernels release the interpreter); one that sends nothing for
    # this long is stopped or hung, and the engine fails its requests naming that rank.
    worker_heartbeat_timeout_s: float = 5.0

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
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if self.scheduling_policy not in POLICIES:
            raise ValueError(f"scheduling_policy must be one of {POLICIES}, got {self.scheduling_policy!r}")
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be at least 1, got {self.ep_size}")
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
