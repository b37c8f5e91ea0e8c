"""Expert parallelism: each MoE layer's routed experts live in physical slots spread evenly over
the ranks, rank r of N holding slots [r·S, (r+1)·S); every token's expert choices are sent to the
ranks that hold them and the results come back (torch.distributed all_to_all_single: NCCL on GPUs,
gloo on CPUs).

Without EPLB the slots are the logical experts themselves (S = E/N, rank r holds experts
[r·E/N, (r+1)·E/N)). With EPLB (engine/eplb.py) a layer has E + R slots and a placement, slot s
holding logical expert placement[s]: a hot expert may have several replicas, each token's choice
of it goes to one of them (the model's math is unchanged), and the placement changes while
serving, the weights moving between ranks (`move_experts`) between two steps.

Per MoE layer, per step, every rank runs the same five collectives in the same order, with zero
rows when it has no tokens, so a rank that has nothing scheduled still serves the others:
  1. row counts per destination rank,   2. token rows (one per token and destination rank),
  3. their k slot ids,   4. their k routing weights,
  5. each row's weighted sum over the destination's experts, back along the reverse route; the
     source adds up what each rank returned.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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
    """This rank's share of the experts. `placements` (EPLB): per MoE layer index, the logical
    expert of each of the layer's num_experts + num_redundant slots; None: the static ranges."""

    def __init__(self, rank: int, size: int, num_experts: int, num_redundant: int = 0,
                 placements: dict[int, list[int]] | None = None):
        self.rank = rank
        self.size = size
        self.num_experts = num_experts
        self.local = expert_range(rank, size, num_experts) if placements is None else None  # the static range
        self.num_slots = num_experts + num_redundant
        if self.num_slots % size:
            raise ValueError(f"{num_experts} routed experts + {num_redundant} redundant slots do not split "
                             f"evenly over ep_size {size} ranks")
        if num_redundant and placements is None:  # (the static ranges have one slot per expert)
            raise ValueError("redundant expert slots need a placement (EPLB)")
        self.slots_per_rank = self.num_slots // size
        self.first_slot = rank * self.slots_per_rank
        self.placements = placements

    @property
    def balanced(self) -> bool:
        """Whether slots follow a placement (EPLB) rather than the static ranges."""
        return self.placements is not None

    def placement(self, layer_idx: int) -> list[int]:
        if self.placements is None:
            return list(range(self.num_experts))
        return self.placements[layer_idx]

    def local_experts(self, layer_idx: int) -> list[int]:
        """The logical expert of each of this rank's slots in that layer (none in a dense layer)."""
        if self.placements is not None and layer_idx not in self.placements:
            return []
        return self.placement(layer_idx)[self.first_slot : self.first_slot + self.slots_per_rank]

    def dispatch_combine(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts) -> torch.Tensor:
        """x [T, hidden]; weights, ids [T, k] (global slot ids; T may be 0). `experts` runs this
        rank's slots on rows with their k choices, summing w·expert(x) over the choices it holds
        (the others count zero). Returns Σ_k w·expert(x) per token.

        A token goes once to each rank that holds at least one of its experts, with all k choices,
        not once per choice: with top-8 routing that divides the rows moved by up to 8/N."""
        T, k = ids.shape
        dest = torch.div(ids, self.slots_per_rank, rounding_mode="floor")  # [T, k]
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

    def move_experts(self, slot_tensors: Sequence[torch.Tensor], old: list[int], new: list[int]) -> int:
        """Makes this rank's slots hold `new`'s experts where they held `old`'s: `slot_tensors` are
        the layer's expert weights on this rank, one row per local slot (any layout). A slot whose
        expert changes takes a copy from a slot of this rank that holds it, else from a rank that
        held it (the holders taking turns), over one all_to_all per tensor: every rank computes the
        same list of transfers from the two placements, so every rank joins the same collectives.
        In place (CUDA graphs keep their pointers). Returns the slots whose expert changed."""
        S, r = self.slots_per_rank, self.rank
        holders: dict[int, list[int]] = {}
        for s, e in enumerate(old):
            holders.setdefault(e, []).append(s)
        transfers = []  # (source slot, destination slot), destination order
        for dst, e in enumerate(new):
            if old[dst] == e:
                continue
            if e not in holders:
                raise ValueError(f"expert {e} has no slot in the current placement to copy it from")
            here = [s for s in holders[e] if s // S == dst // S]
            transfers.append((here[0] if here else holders[e][dst % len(holders[e])], dst))
        if not transfers:
            return 0
        sends = [(s, d) for s, d in transfers if s // S == r and d // S != r]  # by destination rank, slot
        recvs = sorted(((s, d) for s, d in transfers if d // S == r and s // S != r),
                       key=lambda t: (t[0] // S, t[1]))  # as each source rank orders its sends to r
        local = [(s, d) for s, d in transfers if s // S == r and d // S == r]
        crosses = any(s // S != d // S for s, d in transfers)  # (the same answer on every rank)
        send_split = [sum(1 for _, d in sends if d // S == q) for q in range(self.size)]
        recv_split = [sum(1 for s, _ in recvs if s // S == q) for q in range(self.size)]
        src_local = torch.tensor([s - r * S for s, _ in local], dtype=torch.long)
        src_sent = torch.tensor([s - r * S for s, _ in sends], dtype=torch.long)
        dst = torch.tensor([d - r * S for _, d in local] + [d - r * S for _, d in recvs], dtype=torch.long)
        for t in slot_tensors:
            rows = _as_bytes(t)  # the same memory as bytes (index_copy_ has no FP8 kernel; gloo no FP8 or bf16)
            parts = [rows.index_select(0, src_local.to(t.device))] if local else []
            if crosses:
                got = rows.new_empty((len(recvs), rows.shape[1]))
                dist.all_to_all_single(got, rows.index_select(0, src_sent.to(t.device)), recv_split, send_split)
                parts.append(got)
            if len(dst):
                rows.index_copy_(0, dst.to(t.device), torch.cat(parts))
        return len(transfers)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[rows, ...] (contiguous, rows > 0) as [rows, bytes per row] of uint8, the same memory."""
    if not t.is_contiguous():
        raise ValueError("expert weights must be contiguous to move between ranks")
    return t.view(t.shape[0], -1).view(torch.uint8)


def replica_table(placement: Sequence[int], num_experts: int, width: int, slots_per_rank: int | None = None,
                  rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, width] the slots a token's choice of each logical expert may go to (padded by repeating
    the first) and [E] how many: a token's choice of expert e goes to slots[e, i % count[e]]. Given
    the rank the tokens are on, an expert with a replica there goes to it alone (SGLang's static
    dispatch does the same): the choice needs no transfer, and as every rank serves its own share
    of the tokens, the replicas still split an expert's load."""
    slots = [[] for _ in range(num_experts)]
    for s, e in enumerate(placement):
        slots[e].append(s)
    if any(not held for held in slots) or max(map(len, slots)) > width:
        raise ValueError("a placement must give every expert between 1 and "
                         f"{width} slots, got {[len(h) for h in slots]}")
    if rank is not None:
        slots = [[s for s in held if s // slots_per_rank == rank][:1] or held for held in slots]
    table = torch.tensor([held + [held[0]] * (width - len(held)) for held in slots], dtype=torch.long)
    return table, torch.tensor([len(h) for h in slots], dtype=torch.long)
