"""EPLB (engine/eplb.py, model/expert_parallel.py): placements, the weights moving between ranks,
routing to replicas, the load file, and the options' checks. The engine end to end with EPLB is in
tests/test_expert_parallel.py (greedy outputs against one rank)."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.eplb import ExpertBalancer, initial_placements, read_load_file, write_load_file
from engine.eplb_placement import Placement, keep_in_place, place_layer
from engine.model_config import ModelConfig
from kernels.routed_experts import RoutedExperts
from model.expert_parallel import ExpertParallel, replica_table

NUM_EXPERTS, HIDDEN, INTER = 12, 64, 32


def _expert_weights(e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical expert e's gate_up [2I, H] and down [H, I], the same in every process."""
    g = torch.Generator().manual_seed(1000 + e)
    return torch.randn(2 * INTER, HIDDEN, generator=g), torch.randn(HIDDEN, INTER, generator=g)


def _expert_scales(e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Its FP8 block scales (blocks of 16 here)."""
    g = torch.Generator().manual_seed(2000 + e)
    return (torch.rand(2 * INTER // 16, HIDDEN // 16, generator=g) + 0.5,
            torch.rand(HIDDEN // 16, INTER // 16, generator=g) + 0.5)


def _routed(experts: list[int], layout: str, first: int) -> RoutedExperts:
    """Those experts' slots in one of RoutedExperts' layouts: the batched matmuls', the compiled
    kernel's packed strips (made without running the kernel), or FP8 with block scales."""
    gate_up, down = (torch.stack(t) for t in zip(*(_expert_weights(e) for e in experts)))
    if layout == "fp8":
        scales = (torch.stack(t) for t in zip(*(_expert_scales(e) for e in experts)))
        return RoutedExperts(gate_up.to(torch.float8_e4m3fn), down.to(torch.float8_e4m3fn), first, *scales)
    dtype = torch.bfloat16 if layout == "packed" else torch.float32
    return RoutedExperts(gate_up.to(dtype), down.to(dtype), first, compiled=layout == "packed")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _mover(rank: int, size: int, port: int, redundant: int, failures) -> None:
    try:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=size)
        rng = np.random.default_rng(7)  # the same loads in every process
        placement = place_layer(np.ones(NUM_EXPERTS), size, redundant)
        ep = ExpertParallel(rank, size, NUM_EXPERTS, redundant, {1: placement.slot_expert})
        layers = {lay: _routed(ep.local_experts(1), lay, ep.first_slot) for lay in ("batched", "packed", "fp8")}
        moved = 0
        for _ in range(6):
            load = rng.permutation(1000.0 / np.arange(1, NUM_EXPERTS + 1) ** 1.5)
            new = place_layer(load, size, redundant)
            new.check(NUM_EXPERTS, size)
            S = ep.slots_per_rank
            assert len(new.slot_expert) // S == size and len(new.slot_expert) % S == 0
            for routed in layers.values():
                moved = ep.move_experts(list(routed.parameters()), placement.slot_expert, new.slot_expert)
            placement = new
            # Every slot bit-equal to a fresh copy of its expert.
            for j, e in enumerate(new.slot_expert[ep.first_slot : ep.first_slot + S]):
                for lay in ("batched", "packed"):
                    ref = _routed([e], lay, 0)
                    for got, want in zip(layers[lay].parameters(), ref.parameters()):
                        assert torch.equal(_bits(got[j]), _bits(want[0])), (rank, lay, j, e)
                fp8 = layers["fp8"]
                gate_up, down = _expert_weights(e)
                assert torch.equal(_bits(fp8.gate_up[j]), _bits(gate_up.to(torch.float8_e4m3fn)))
                assert torch.equal(_bits(fp8.down[j]), _bits(down.to(torch.float8_e4m3fn)))
                gate_up_scale, down_scale = _expert_scales(e)  # scales travel with their expert
                assert torch.equal(fp8.gate_up_scale[j], gate_up_scale) and torch.equal(fp8.down_scale[j], down_scale)
        assert moved > 0
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException as e:  # noqa: B036 - reported to the parent, which fails the test
        failures.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("size,redundant", [(2, 2), (4, 4)])
def test_moved_slots_are_bit_equal_to_their_experts_after_every_replacement(size, redundant):
    """Six re-placements of one layer over gloo, in the three weight layouts (FP8 with its
    scales); each one a valid placement (every expert has a replica, slots per rank equal)."""
    ctx = mp.get_context("spawn")
    failures = ctx.SimpleQueue()
    port = _port()
    procs = [ctx.Process(target=_mover, args=(r, size, port, redundant, failures)) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not alive and not errors and all(p.exitcode == 0 for p in procs), errors


def _replica_router(rank: int, size: int, placement: list[int], num_experts: int, local: bool = True):
    """A MoE layer on rank `rank` of `size`, reduced to its replica routing."""
    from model.moe import MoE

    moe = MoE.__new__(MoE)
    torch.nn.Module.__init__(moe)
    moe.ep = ExpertParallel(rank, size, num_experts, len(placement) - num_experts, {1: placement})
    width = len(placement) - num_experts + 1
    table, count = (replica_table(placement, num_experts, width, moe.ep.slots_per_rank, rank) if local
                    else replica_table(placement, num_experts, width))
    moe.register_buffer("replica_slots", table)
    moe.register_buffer("replica_count", count)
    return moe


def test_choices_of_a_replicated_expert_split_evenly_over_its_replicas():
    placement = [0, 1, 2, 3, 0, 0]  # expert 0 in slots 0, 4 and 5
    for rank in (0, 1):
        router = _replica_router(rank, 2, placement, 4, local=False)
        slots = router._to_slots(torch.tensor([[0, 1]] * 9 + [[2, 3]] * 3))
        assert slots[:9, 1].tolist() == [1] * 9 and slots[9:].tolist() == [[2, 3]] * 3
        assert sorted(np.bincount(slots[:9, 0].numpy(), minlength=6)[[0, 4, 5]].tolist()) == [3, 3, 3]
    one_token = [int(_replica_router(rank, 2, placement, 4, local=False)._to_slots(torch.tensor([[0]]))[0, 0])
                 for rank in (0, 1)]
    assert one_token[0] != one_token[1]  # one-token steps of two ranks pick different replicas


def test_a_replica_on_the_tokens_rank_takes_its_choices_and_the_others_split():
    placement = [1, 0, 0, 2, 3, 1]  # 3 ranks of 2 slots; expert 1 on ranks 0 and 2, expert 0 on 0 and 1
    router = _replica_router(1, 3, placement, 4)
    slots = router._to_slots(torch.tensor([[0, 1]] * 8))
    assert slots[:, 0].tolist() == [2] * 8  # expert 0: rank 1's own replica
    assert sorted(np.bincount(slots[:, 1].numpy(), minlength=6)[[0, 5]].tolist()) == [4, 4]  # no replica here


def test_the_balancer_replaces_every_interval_from_a_snapshot_a_layer_a_step(tiny_checkpoint):
    import engine.eplb as eplb

    cfg = ModelConfig.from_checkpoint(tiny_checkpoint)
    config = EngineConfig(str(tiny_checkpoint), ep_size=4, enable_eplb=True, num_redundant_experts=4,
                          eplb_interval_steps=5, num_speculative_tokens=2)
    b = ExpertBalancer(config, cfg)
    assert b.layers == [1, 2, 3]  # two MoE layers of the main model, then the MTP layer
    for slots in b.placements.values():  # from an even load
        Placement(slots, np.bincount(slots, minlength=16).tolist(), 5).check(16, 4)
    skewed = np.stack([np.arange(16, 0, -1) ** 2] * 3)
    assert [b.on_step(skewed) for _ in range(4)] == [None] * 4  # not due yet
    old = dict(b.placements)
    eplb.PLACEMENT_BUDGET_S, saved = 0.0, eplb.PLACEMENT_BUDGET_S
    try:  # one layer placed a step (a zero budget), and each switches with the step after it is placed
        switched = [b.on_step(skewed), b.on_step(np.zeros((3, 16))), b.on_step(np.zeros((3, 16)))]
    finally:
        eplb.PLACEMENT_BUDGET_S = saved
    assert [sorted(s) for s in switched] == [[1], [2], [3]] and b.rebalances == 1
    new = {layer: slots for s in switched for layer, slots in s.items()}
    assert b.placements == new and new != old
    for layer in (1, 2, 3):  # from the snapshot (not the later counts), slots arranged to move the least
        want = keep_in_place(old[layer], place_layer(skewed[0], 4, 4))
        assert new[layer] == want.slot_expert
        assert sorted(new[layer]) == sorted(place_layer(skewed[0], 4, 4).slot_expert)
    assert b.moved_slots == sum(a != c for layer in new for a, c in zip(old[layer], new[layer]))
    assert new[1].count(0) > 1  # the hottest expert has replicas
    for _ in range(5):  # the same load again: no change, nothing sent
        assert b.on_step(skewed) is None
    assert b.rebalances == 1
    eplb.SWITCH_LAYERS_PER_STEP, saved = 3, eplb.SWITCH_LAYERS_PER_STEP
    try:  # a new load: placed at once when due (the default budget), switched together
        for _ in range(5):
            if (together := b.on_step(skewed[:, ::-1].copy())) is not None:
                break
    finally:
        eplb.SWITCH_LAYERS_PER_STEP = saved
    assert sorted(together) == [1, 2, 3] and b.rebalances == 2


def _moved(old: Placement, new: Placement) -> int:
    return sum(a != b for a, b in zip(old.slot_expert, new.slot_expert))


def test_keeping_slots_in_place_keeps_the_balance_and_moves_only_what_changed():
    from engine.eplb_placement import imbalance

    rng = np.random.default_rng(3)
    base = 1000.0 / np.arange(1, 65) ** 1.2
    for ranks, redundant in ((4, 4), (8, 16)):
        old = place_layer(rng.permutation(base), ranks, redundant)
        load = base * rng.uniform(0.7, 1.3, 64)
        fresh = place_layer(load, ranks, redundant)
        kept = keep_in_place(old.slot_expert, fresh)
        kept.check(64, ranks)
        assert imbalance(kept.rank_loads(load)) == pytest.approx(imbalance(fresh.rank_loads(load)))
        assert _moved(old, kept) < _moved(old, fresh)
        assert keep_in_place(old.slot_expert, old).slot_expert == old.slot_expert  # nothing to move


def test_placement_by_host_keeps_each_expert_group_on_one_host_and_balances():
    from engine.eplb_placement import imbalance, place_layer_by_host

    rng = np.random.default_rng(5)
    experts, groups, hosts, ranks, redundant = 32, 8, 2, 4, 4
    for _ in range(3):
        load = rng.permutation(1000.0 / np.arange(1, experts + 1) ** 1.1)
        p = place_layer_by_host(load, ranks, redundant, hosts, groups)
        p.check(experts, ranks)
        per_host = len(p.slot_expert) // hosts
        host_of_group = {}
        for s, e in enumerate(p.slot_expert):
            assert host_of_group.setdefault(e // (experts // groups), s // per_host) == s // per_host
        assert sorted(set(host_of_group.values())) == [0, 1] and len(host_of_group) == groups
        assert imbalance(p.rank_loads(load)) < 1.15
        again = keep_in_place(p.slot_expert, place_layer_by_host(load * rng.uniform(0.5, 1.5, experts), ranks,
                                                                 redundant, hosts, groups), hosts)
        again.check(experts, ranks)
    assert place_layer_by_host(load, 4, 4, 3, 8).slot_expert == place_layer(load, 4, 4).slot_expert  # (flat)


def test_the_load_file_round_trips_and_places_the_start(tiny_checkpoint, tmp_path):
    cfg = ModelConfig.from_checkpoint(tiny_checkpoint)
    path = tmp_path / "load.json"
    config = EngineConfig(str(tiny_checkpoint), ep_size=4, enable_eplb=True, num_redundant_experts=4,
                          eplb_load_file=str(path))
    assert read_load_file(path, [1, 2], 16) is None  # no file yet: an even start
    even = initial_placements(config, cfg)
    counts = {1: np.arange(16) * 3, 2: np.arange(16)[::-1].copy()}
    write_load_file(path, counts, 16)
    assert {k: v.tolist() for k, v in read_load_file(path, [1, 2], 16).items()} == {
        k: v.tolist() for k, v in counts.items()}
    placed = initial_placements(config, cfg)
    assert placed == {1: place_layer(counts[1], 4, 4).slot_expert, 2: place_layer(counts[2], 4, 4).slot_expert}
    assert placed != even


@pytest.mark.parametrize("content,problem", [
    ("{not json", "not readable JSON"),
    ("[" * 100000 + "]" * 100000, "not readable JSON|not an expert load file"),
    (json.dumps({"format": "other"}), "not an expert load file"),
    (json.dumps({"format": "mlaserve-expert-load/1", "num_experts": 8, "layers": {}}), "counts 8 routed experts"),
    (json.dumps({"format": "mlaserve-expert-load/1", "num_experts": 16, "layers": []}), "'layers' must map"),
    (json.dumps({"format": "mlaserve-expert-load/1", "num_experts": 16, "layers": {"0": [1] * 16}}),
     "not one of this model's MoE layers"),
    (json.dumps({"format": "mlaserve-expert-load/1", "num_experts": 16, "layers": {"1": [1] * 15}}),
     "must have 16 counts"),
    (json.dumps({"format": "mlaserve-expert-load/1", "num_experts": 16, "layers": {"1": [-1] + [1] * 15}}),
     "integers >= 0"),
    ('{"format": "mlaserve-expert-load/1", "num_experts": 16, "layers": {"1": [NaN' + ", 1" * 15 + "]}}",
     "integers >= 0"),
    (json.dumps({"format": "mlaserve-expert-load/1", "num_experts": 16, "layers": {"1": [True] * 16}}),
     "integers >= 0"),
    (json.dumps({"format": "mlaserve-expert-load/1", "num_experts": 16, "layers": {"1": [10**30] * 16}}),
     "integers >= 0"),
])
def test_a_bad_load_file_is_refused_naming_what_is_wrong(tiny_checkpoint, tmp_path, content, problem):
    from engine import LLM

    path = tmp_path / "load.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem):
        read_load_file(path, [1, 2, 3], 16)
    if problem == "not an expert load file":  # and the engine refuses to start with it, before any process
        with pytest.raises(ValueError, match=problem):
            LLM(tiny_checkpoint, ep_size=2, enable_eplb=True, eplb_load_file=str(path))


def test_eplb_options_are_checked(tiny_checkpoint, tmp_path):
    from engine import LLM

    for kw, problem in [
        (dict(num_redundant_experts=2), "need enable_eplb"),
        (dict(eplb_load_file=str(tmp_path / "f")), "need enable_eplb"),
        (dict(enable_eplb=True), "needs ep_size >= 2"),
        (dict(enable_eplb=True, ep_size=2, num_redundant_experts=-1), "num_redundant_experts must be in"),
        (dict(enable_eplb=True, ep_size=2, num_redundant_experts=10**9), "num_redundant_experts must be in"),
        (dict(enable_eplb=True, ep_size=2, eplb_window_steps=0), "eplb_window_steps"),
        (dict(enable_eplb=True, ep_size=2, eplb_interval_steps=10**12), "eplb_interval_steps"),
    ]:
        with pytest.raises(ValueError, match=problem):
            EngineConfig(str(tiny_checkpoint), **kw)
    with pytest.raises(ValueError, match=r"16 routed experts \+ num_redundant_experts 1 do not split evenly over "
                                         r"ep_size 2"):
        LLM(tiny_checkpoint, ep_size=2, enable_eplb=True, num_redundant_experts=1)
    assert os.listdir(tmp_path) == []
