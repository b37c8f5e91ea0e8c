"""Where each expert's copies go: a placement of E logical experts on N ranks with R redundant
slots (E + R physical slots, the same number per rank), from each expert's measured load, in the
manner of DeepSeek's published EPLB: the heaviest experts get the extra replicas (each time to the
expert whose load per replica is highest), then the replicas are packed onto the ranks heaviest
first, each to the least loaded rank that still has a free slot and no copy of that expert.
Tokens of an expert with several replicas are assumed to split evenly among them.

Pure Python and numpy: the scheduler process computes it (engine/eplb.py), ~0.3-1 ms a layer of
DeepSeek-V3 (256 experts, 32 redundant, 8 to 64 ranks).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass
class Placement:
    """One MoE layer's placement: slot s (rank s // slots_per_rank) holds logical expert
    slot_expert[s]; expert e has replicas[e] copies."""
    slot_expert: list[int]
    replicas: list[int]
    slots_per_rank: int

    def rank_loads(self, load: np.ndarray) -> np.ndarray:
        """Each rank's share of `load` (per logical expert) under this placement."""
        share = np.asarray(load, dtype=np.float64) / np.asarray(self.replicas)
        per_slot = share[np.asarray(self.slot_expert)]
        return per_slot.reshape(-1, self.slots_per_rank).sum(axis=1)

    def check(self, num_experts: int, num_ranks: int) -> None:
        """Raises AssertionError unless this is a valid placement."""
        assert len(self.slot_expert) == num_ranks * self.slots_per_rank, "slots per rank differ"
        held = np.bincount(self.slot_expert, minlength=num_experts)
        assert held.tolist() == list(self.replicas), "replica counts differ from the slots"
        assert min(self.replicas) >= 1, "an expert has no replica"


def place_layer(load, num_ranks: int, num_redundant: int) -> Placement:
    load = np.asarray(load, dtype=np.float64)
    experts = len(load)
    slots = experts + num_redundant
    if slots % num_ranks:
        raise ValueError(f"{experts} experts + {num_redundant} redundant slots do not split evenly over "
                         f"{num_ranks} ranks")
    per_rank = slots // num_ranks
    replicas = np.ones(experts, dtype=np.int64)
    for _ in range(num_redundant):
        replicas[int(np.argmax(load / replicas))] += 1
    # Replicas heaviest first (ties: lower expert id first, so the result is deterministic).
    items = sorted(((load[e] / replicas[e], e) for e in range(experts) for _ in range(replicas[e])),
                   key=lambda item: (-item[0], item[1]))
    # Ranks with a free slot, least loaded first (ties: lower rank), in a heap: O(log N) a replica.
    open_ranks = [(0.0, r) for r in range(num_ranks)]
    rank_slots: list[list[int]] = [[] for _ in range(num_ranks)]
    for weight, e in items:
        passed = []  # least loaded ranks that already hold a copy of e
        while open_ranks and e in rank_slots[open_ranks[0][1]]:
            passed.append(heapq.heappop(open_ranks))
        load_r, r = heapq.heappop(open_ranks) if open_ranks else passed.pop(0)
        for item in passed:
            heapq.heappush(open_ranks, item)
        rank_slots[r].append(e)
        if len(rank_slots[r]) < per_rank:
            heapq.heappush(open_ranks, (load_r + weight, r))
    return Placement([e for r in rank_slots for e in r], replicas.tolist(), per_rank)


def place_layer_by_host(load, num_ranks: int, num_redundant: int, num_hosts: int, num_groups: int) -> Placement:
    """DeepSeek's hierarchical EPLB, for several hosts: the router picks a token's experts within
    its topk_group best groups, so whole groups go to hosts (heaviest first, each to the least
    loaded host with room), then each host replicates and packs its own experts as place_layer
    does, with its share of the redundant slots: a token's choices reach few hosts. Flat where
    the groups, slots or ranks do not split evenly over the hosts."""
    load = np.asarray(load, dtype=np.float64)
    experts = len(load)
    if (num_hosts <= 1 or num_groups % num_hosts or experts % num_groups or num_redundant % num_hosts
            or num_ranks % num_hosts or (experts + num_redundant) % num_ranks):
        return place_layer(load, num_ranks, num_redundant)
    per_group, groups_per_host = experts // num_groups, num_groups // num_hosts
    group_load = load.reshape(num_groups, per_group).sum(axis=1)
    host_groups: list[list[int]] = [[] for _ in range(num_hosts)]
    host_load = np.zeros(num_hosts)
    for g in np.argsort(-group_load, kind="stable"):
        h = min((h for h in range(num_hosts) if len(host_groups[h]) < groups_per_host),
                key=lambda h: (host_load[h], h))
        host_groups[h].append(int(g))
        host_load[h] += group_load[g]
    slots: list[int] = []
    replicas = [0] * experts
    for groups in host_groups:
        mine = sorted(e for g in groups for e in range(g * per_group, (g + 1) * per_group))
        p = place_layer(load[mine], num_ranks // num_hosts, num_redundant // num_hosts)
        slots += [mine[i] for i in p.slot_expert]
        for i, n in enumerate(p.replicas):
            replicas[mine[i]] = n
    return Placement(slots, replicas, (experts + num_redundant) // num_ranks)


def keep_in_place(old: list[int], new: Placement, num_hosts: int = 1) -> Placement:
    """`new` with its ranks renumbered and each rank's slots reordered so that as many slots as
    possible keep the expert they hold in `old` (a rank's set of experts is what balances it; which
    rank and which of its slots hold them is free): a re-placement moves only what changed, not a
    reshuffle. Ranks pair up greedily, largest overlap first, within each host (a host's experts
    stay on it: place_layer_by_host chose them)."""
    S = new.slots_per_rank
    if num_hosts > 1:
        per_host = len(old) // num_hosts
        kept = [keep_in_place(old[h * per_host : (h + 1) * per_host],
                              Placement(new.slot_expert[h * per_host : (h + 1) * per_host], new.replicas, S))
                for h in range(num_hosts)]
        return Placement([e for k in kept for e in k.slot_expert], list(new.replicas), S)
    num_ranks, experts = len(old) // S, len(new.replicas)
    old_counts, new_counts = np.zeros((num_ranks, experts), np.int64), np.zeros((num_ranks, experts), np.int64)
    np.add.at(old_counts, (np.arange(len(old)) // S, old), 1)
    np.add.at(new_counts, (np.arange(len(new.slot_expert)) // S, new.slot_expert), 1)
    overlap = np.minimum(new_counts[:, None, :], old_counts[None, :, :]).sum(axis=2)  # [new rank, old rank]
    rank_of: dict[int, int] = {}
    taken: set[int] = set()
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        i, j = divmod(int(flat), num_ranks)
        if i not in rank_of and j not in taken:
            rank_of[i] = j
            taken.add(j)
    slots = [-1] * len(old)
    for i, j in rank_of.items():
        left = new.slot_expert[i * S : (i + 1) * S]
        for s in range(j * S, (j + 1) * S):  # an expert this rank held stays in its slot
            if old[s] in left:
                left.remove(old[s])
                slots[s] = old[s]
        for s in range(j * S, (j + 1) * S):
            if slots[s] < 0:
                slots[s] = left.pop(0)
    return Placement(slots, list(new.replicas), S)


def place(layer_loads, num_ranks: int, num_redundant: int) -> list[Placement]:
    """A placement per MoE layer from the window's [layers, experts] counts."""
    return [place_layer(row, num_ranks, num_redundant) for row in np.asarray(layer_loads)]


def imbalance(rank_loads: np.ndarray) -> float:
    """Most loaded rank over the mean rank (1.0: even; 0.0 when nothing was routed)."""
    mean = float(np.mean(rank_loads))
    return float(np.max(rank_loads)) / mean if mean > 0 else 0.0
