"""Per-layer expert load: the scheduler process's window (engine/expert_load.py), the workers'
reports, and a checkpoint whose routers prefer some experts (make_checkpoint's router_skew)."""

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.expert_load import ExpertLoadWindow
from model.checkpoint_maker import make_checkpoint


def blob(rows) -> bytes:
    return np.array(rows, dtype="<i4").tobytes()


def test_the_window_sums_ranks_and_reports_and_forgets_the_oldest():
    w = ExpertLoadWindow(num_ranks=2, window_reports=2)
    assert w.imbalance() == 0.0 and w.rank_loads() is None
    # 2 MoE layers x 4 experts; rank 0 holds experts 0-1, rank 1 experts 2-3.
    w.add([blob([[3, 1, 0, 0], [1, 1, 1, 1]]), blob([[3, 1, 0, 0], [1, 1, 1, 1]])], 4)
    assert w.rank_loads().tolist() == [[8, 0], [4, 4]]
    assert w.imbalance() == pytest.approx((2.0 + 1.0) / 2)  # layer 0: 8 / 4; layer 1: even
    w.add([blob([[0, 0, 4, 4], [0, 0, 0, 0]])], 4)
    assert w.rank_loads().tolist() == [[8, 8], [4, 4]]
    w.add([blob([[0, 0, 0, 0], [0, 0, 0, 0]])], 4)  # the first report leaves the window
    assert w.rank_loads().tolist() == [[0, 8], [0, 0]]
    assert w.imbalance() == pytest.approx(2.0)  # (the idle layer is left out)


def _imbalance(checkpoint, **options) -> tuple[float, list[int]]:
    prompts = [[(7 * i + j) % 250 + 2 for j in range(24)] for i in range(8)]
    with LLM(checkpoint, dtype="float32", block_size=16, kv_cache_memory=1 << 24, ep_size=2, **options) as llm:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
        stats = llm.stats()
    return stats.moe_imbalance, stats.moe_window_rank_load


def test_a_skewed_router_loads_the_first_rank_the_imbalance_shows_it_and_eplb_evens_it(tiny_checkpoint, tmp_path):
    even, even_loads = _imbalance(tiny_checkpoint)
    skewed_checkpoint = make_checkpoint("tiny", seed=0, out_dir=tmp_path, router_skew=0.2)
    skewed, skewed_loads = _imbalance(skewed_checkpoint)
    assert 1.0 <= even < 1.3 and len(even_loads) == 2
    assert skewed > 1.5 and skewed_loads[0] > 3 * skewed_loads[1]
    # The window is the last 16 steps' slot loads, after re-placements every 8 steps.
    balanced, balanced_loads = _imbalance(skewed_checkpoint, enable_eplb=True, num_redundant_experts=2,
                                          eplb_interval_steps=8, eplb_window_steps=16)
    assert balanced < 1.2 and max(balanced_loads) < 1.3 * min(balanced_loads), (skewed, balanced, balanced_loads)


@pytest.mark.parametrize("num_ranks,redundant", [(2, 2), (4, 4), (4, 8), (8, 8)])
def test_placement_is_valid_and_evens_a_skewed_load(num_ranks, redundant):
    from engine.eplb_placement import Placement, imbalance, place

    rng = np.random.default_rng(num_ranks + redundant)
    experts = 32
    # Zipf-like loads in a random order, a layer at a time, the hottest expert far above the mean.
    layers = np.stack([rng.permutation(1000.0 / np.arange(1, experts + 1) ** 1.1) for _ in range(4)])
    static = Placement(list(range(experts)), [1] * experts, experts // num_ranks)
    for load, p in zip(layers, place(layers, num_ranks, redundant)):
        p.check(experts, num_ranks)
        per_rank = [p.slot_expert[r * p.slots_per_rank : (r + 1) * p.slots_per_rank] for r in range(num_ranks)]
        for s in per_rank:  # two copies of an expert on one rank only when it has more copies than ranks
            assert all(s.count(e) <= -(-p.replicas[e] // num_ranks) for e in s), "needless copies on a rank"
        before, after = imbalance(static.rank_loads(load)), imbalance(p.rank_loads(load))
        assert after < before and after <= 1.1, (before, after)
    with pytest.raises(ValueError, match="do not split evenly"):
        place(layers, 3, 2)


def test_placement_of_an_even_load_keeps_every_rank_even():
    from engine.eplb_placement import imbalance, place_layer

    p = place_layer([5.0] * 16, 4, 0)
    assert sorted(p.slot_expert) == list(range(16)) and imbalance(p.rank_loads([5.0] * 16)) == 1.0
