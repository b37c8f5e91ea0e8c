"""Expert parallelism: rank r of N holds routed experts [r·E/N, (r+1)·E/N); every token's expert
choices are sent to the ranks that hold them and the results come back (torch.distributed
all_to_all_single: NCCL on GPUs, gloo on CPUs).

Per MoE layer, per step, every rank runs the same four collectives in the same order, with zero
rows when it has no tokens, so a rank that has nothing scheduled still serves the others:
  1. choice counts per destination rank,   2. token rows,   3. their expert ids,
  4. the expert outputs, back along the reverse route; the source sums them with the routing
     weights.
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


class ExpertParallel:
    def __init__(self, rank: int, size: int, num_experts: int):
        self.rank = rank
        self.size = size
        self.local = expert_range(rank, size, num_experts)

    def dispatch_combine(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts) -> torch.Tensor:
        """x [T, hidden]; weights, ids [T, k] (global expert ids; T may be 0). `experts` runs this
        rank's experts on rows that each carry one expert id. Returns Σ_k w·expert(x) per token."""
        T, k = ids.shape
        flat = ids.flatten()
        dest = torch.div(flat, len(self.local), rounding_mode="floor")
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=self.size).to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        source_row = torch.div(order, k, rounding_mode="floor")
        rows = x[source_row].contiguous()
        got_rows = x.new_empty(sum(recv), x.shape[1])
        dist.all_to_all_single(got_rows, rows, recv, send)
        got_ids = flat.new_empty(sum(recv))
        dist.all_to_all_single(got_ids, flat[order].contiguous(), recv, send)
        ones = torch.ones(len(got_ids), 1, dtype=weights.dtype, device=x.device)
        y = experts(got_rows, ones, got_ids[:, None]) if len(got_ids) else got_rows
        back = x.new_empty(sum(send), x.shape[1])
        dist.all_to_all_single(back, y.to(x.dtype).contiguous(), send, recv)
        back = back * weights.flatten()[order].to(back.dtype)[:, None]
        return torch.zeros_like(x).index_add_(0, source_row, back)
