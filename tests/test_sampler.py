"""Sampler: each filter and penalty on hand-made logits; draws follow the distribution."""

import math

import torch

from engine.sampling_params import SamplingParams
from model.sampler import SampleRow, sample

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])


def row(output=(), prompt=(0,), **kw):
    return SampleRow("r", SamplingParams(**kw), list(prompt), list(output))


def draw_counts(logits, n=4000, **kw):
    counts = torch.zeros(logits.shape[1])
    for i in range(n):
        tok, _ = sample(logits, [SampleRow(f"r{i}", SamplingParams(seed=i, **kw), [0], [])], None)
        counts[tok[0]] += 1
    return counts


def test_greedy_takes_argmax():
    assert sample(LOGITS, [row(temperature=0)], None)[0] == [0]


def test_top_k_and_top_p_keep_only_the_head():
    assert set(draw_counts(LOGITS, n=300, top_k=2).nonzero().flatten().tolist()) <= {0, 1}
    probs = LOGITS.softmax(-1)[0]  # 0.53, 0.19, 0.12, 0.07, 0.03
    assert draw_counts(LOGITS, n=300, top_p=0.5).nonzero().flatten().tolist() == [0]
    kept = set(draw_counts(LOGITS, n=500, top_p=float(probs[0] + 0.01)).nonzero().flatten().tolist())
    assert kept == {0, 1}


def test_min_p_drops_unlikely_tokens():
    kept = set(draw_counts(LOGITS, n=500, min_p=0.3).nonzero().flatten().tolist())
    assert kept == {0, 1}  # p1/p0 = e^-1 = 0.37 >= 0.3; p2/p0 = 0.22 < 0.3


def test_draws_follow_the_softmax():
    counts = draw_counts(LOGITS, n=4000)
    expected = LOGITS.softmax(-1)[0] * 4000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001


def test_same_seed_and_position_same_token_different_position_moves_on():
    a = sample(LOGITS, [row(seed=5, output=[1, 2])], None)[0]
    b = sample(LOGITS.clone(), [row(seed=5, output=[3, 4])], None)[0]
    assert a == b  # same seed, same output length: same draw
    draws = {sample(LOGITS, [row(seed=5, output=[0] * n)], None)[0][0] for n in range(40)}
    assert len(draws) > 1


def test_penalties_change_the_argmax():
    assert sample(LOGITS, [row(temperature=0, output=[0], frequency_penalty=2.0)], None)[0] == [1]
    assert sample(LOGITS, [row(temperature=0, output=[0], presence_penalty=1.5)], None)[0] == [1]
    # repetition penalty divides a positive logit: 2.0 / 3 < 1.0
    assert sample(LOGITS, [row(temperature=0, prompt=[0], repetition_penalty=3.0)], None)[0] == [1]


def test_min_tokens_masks_eos_and_stop_ids():
    assert sample(LOGITS, [row(temperature=0, min_tokens=2, stop_token_ids=[1])], eos_token_id=0)[0] == [2]


def test_logprobs_are_of_the_raw_distribution():
    _, lps = sample(LOGITS, [row(temperature=0, logprobs=2, frequency_penalty=2.0, output=[0])], None)
    entry = lps[0][0]
    assert entry.token_id == 1 and entry.rank == 2 and entry.top_ids == [0, 1]
    assert math.isclose(entry.logprob, float(LOGITS.log_softmax(-1)[0, 1]), rel_tol=1e-6)
