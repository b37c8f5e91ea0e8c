"""Expert parallelism: rank r of N holds routed experts [r·E/N, (r+1)·E/N); every token's expert
choices are sent to the ranks that hold them and the results come back (torch.distributed
all_to_all_single: NCCL on GPUs, gloo on CPUs).

Per MoE layer, per step, every rank runs the same five collectives in the same order, with zero
rows when it has no tokens, so a rank that has nothing scheduled still serves the others:
  1. row counts per destination rank,   2. token rows (one per token and destination rank),
  3. their k expert ids,   4. their k routing weights,
  5. each row's weighted sum over the destination's experts, back along the reverse route; the
     source adds up what each rank returned.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def expert_range(rank: int, size: int, num_experts: int) -> range:
    if num_experts % size:
        raise ValueError(f"ep_size {size} does not divide the model's {num_experts} routed experts")
    per = num_experts // size
    return range(rank * per, (rank + 1) * per)


def init_distributed(rank: int, size: int, master_addr: str, master_port: int, device: str,
                     timeout_s: float = 300.0) -> None:
    """Joins the expert-parallel group (torchrun's names: MASTER_ADDR, MASTER_PORT)."""
    os.environ.setdefault("MASTER_ADDR", master_addr)
    os.environ.setdefault("MASTER_PORT", str(master_port))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=size, timeout=timedelta(seconds=timeout_s))


def leave_distributed() -> None:
    """Waits for every rank, then tears the group down."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class ExpertParallel:
    def __init__(self, rank: int, size: int, num_experts: int):
        self.rank = rank
        self.size = size
        self.local = expert_range(rank, size, num_experts)

    def dispatch_combine(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts) -> torch.Tensor:
        """x [T, hidden]; weights, ids [T, k] (global expert ids; T may be 0). `experts` runs this
        rank's experts on rows with their k choices, summing w·expert(x) over the choices it holds
        (the others count zero). Returns Σ_k w·expert(x) per token.

        A token goes once to each rank that holds at least one of its experts, with all k choices,
        not once per choice: with top-8 routing that divides the rows moved by up to 8/N."""
        T, k = ids.shape
        dest = torch.div(ids, len(self.local), rounding_mode="floor")  # [T, k]
        hit = torch.zeros(T, self.size, dtype=torch.bool, device=x.device).scatter_(1, dest, True)
        rank_of_pair, token_of_pair = hit.t().nonzero(as_tuple=True)  # grouped by destination rank
        send_counts = torch.bincount(rank_of_pair, minlength=self.size).to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        n_recv = sum(recv)
        got_rows = x.new_empty(n_recv, x.shape[1])
        dist.all_to_all_single(got_rows, x[token_of_pair].contiguous(), recv, send)
        got_ids = ids.new_empty(n_recv, k)
        dist.all_to_all_single(got_ids, ids[token_of_pair].contiguous(), recv, send)
        got_w = weights.new_empty(n_recv, k)
        dist.all_to_all_single(got_w, weights[token_of_pair].contiguous(), recv, send)
        y = experts(got_rows, got_w, got_ids) if n_recv else got_rows
        back = x.new_empty(len(token_of_pair), x.shape[1])
        dist.all_to_all_single(back, y.to(x.dtype).contiguous(), send, recv)
        return torch.zeros_like(x).index_add_(0, token_of_pair, back)
