"""Sampler: each filter and penalty on hand-made logits; draws follow the distribution."""

import math
import random

import pytest
import torch

from engine.sampling_params import BadWordsIndex, SamplingParams, StructuredOutputsParams
from model.logit_edits import TokenHistory, _banned_by_bad_words
from model.sampler import SampleRow, draft_rows, greedy_verify, sample, speculative_sample

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])


def row(output=(), prompt=(0,), **kw):
    return SampleRow("r", SamplingParams(**kw), list(prompt) + list(output), len(prompt))


def draw_counts(logits, n=4000, **kw):
    counts = torch.zeros(logits.shape[1])
    for i in range(n):
        tok, _ = sample(logits, [SampleRow(f"r{i}", SamplingParams(seed=i, **kw), [0], 1)], None)
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


# Chi-square critical values at p = 0.001, by degrees of freedom.
CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32}


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("draft,params", [
    (1, SamplingParams(temperature=1.0)),  # a likely draft
    (5, SamplingParams(temperature=0.7)),  # an unlikely one
    (4, SamplingParams(temperature=1.0, top_k=4)),  # outside top-k: never accepted
])
def test_rejection_sampling_keeps_the_target_distribution(draft, params):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    n = 6000
    rows = [SampleRow(f"r{i}", params, [2, 3, 4], 2) for i in range(n)]
    # one group per request: the draft's row, then the bonus row
    tokens, _ = speculative_sample(logits.repeat(2 * n, 1), [r for row in rows for r in draft_rows(row, [draft])],
                                   [draft, -1] * n, [2] * n, eos_token_id=None, engine_seed=3)
    first = torch.tensor([t[0] for t in tokens])
    counts = torch.bincount(first, minlength=6).float()
    target = (logits[0] / params.temperature)
    if params.top_k:
        target[params.top_k:] = float("-inf")
    p = target.softmax(-1)
    support = p > 0
    assert counts[~support].sum() == 0
    assert _chi2(counts[support], p[support]) < CHI2_999[int(support.sum()) - 1]
    accepted = sum(len(t) == 2 for t in tokens)
    assert abs(accepted / n - float(p[draft])) < 4 * (float(p[draft]) * (1 - float(p[draft])) / n) ** 0.5 + 1e-9
    assert all(t[0] == draft for t in tokens if len(t) == 2)  # what is emitted after an acceptance
    assert all(t[0] != draft for t in tokens if len(t) == 1)  # a rejection never emits the draft


def test_greedy_verification_accepts_the_argmax_prefix():
    logits = torch.zeros(4, 10)
    for row, best in enumerate([3, 4, 9, 7]):
        logits[row, best] = 5.0
    rows = draft_rows(SampleRow("g", SamplingParams(temperature=0), [1], 1), [3, 4, 8])
    tokens, _ = speculative_sample(logits, rows, [3, 4, 8, -1], [4], None)
    assert tokens == [[3, 4, 9]]  # two drafts accepted, the third replaced by the argmax


def test_logit_bias_moves_the_argmax_and_the_draws():
    assert sample(LOGITS, [row(temperature=0, logit_bias={3: 2.5})], None)[0] == [3]  # 0.0 + 2.5 > 2.0
    assert sample(LOGITS, [row(temperature=0, logit_bias={0: -100.0})], None)[0] == [1]
    counts = draw_counts(LOGITS, n=300, logit_bias={0: -100.0, 1: -100.0})
    assert counts[0] == counts[1] == 0 and counts.sum() == 300


def test_allowed_token_ids_are_the_only_ones_drawn():
    assert sample(LOGITS, [row(temperature=0, allowed_token_ids=[2, 4])], None)[0] == [2]
    counts = draw_counts(LOGITS, n=400, allowed_token_ids=[3, 4])
    assert set(counts.nonzero().flatten().tolist()) == {3, 4}  # both drawn: e^-1 apart
    # with a bias inside the allowed set, and with penalties: still only the allowed ones
    assert sample(LOGITS, [row(temperature=0, allowed_token_ids=[3, 4], logit_bias={4: 1.5, 0: 50.0},
                               output=[3], frequency_penalty=1.0)], None)[0] == [4]


def test_bad_words_ban_the_last_token_after_the_rest():
    one = [[0]]  # a one-token word is always banned
    assert sample(LOGITS, [row(temperature=0, bad_words_token_ids=one)], None)[0] == [1]
    two = [[3, 0]]  # token 0 is banned only right after token 3 in the output
    assert sample(LOGITS, [row(temperature=0, bad_words_token_ids=two, output=[3])], None)[0] == [1]
    assert sample(LOGITS, [row(temperature=0, bad_words_token_ids=two, output=[3, 1])], None)[0] == [0]
    assert sample(LOGITS, [row(temperature=0, bad_words_token_ids=two, prompt=[3])], None)[0] == [0]  # prompt: not
    three = [[2, 3, 0]]  # the prefix may run into the drafts being verified
    rows = draft_rows(SampleRow("b", SamplingParams(temperature=0, bad_words_token_ids=three), [9, 2], 1), [3, 0])
    tokens, _ = speculative_sample(LOGITS.repeat(3, 1), rows, [3, 0, -1], [3], None)
    assert tokens == [[0]]  # after [2] alone token 0 is allowed: the argmax 0 rejects draft 3
    tokens, _ = speculative_sample(torch.tensor([[0.0, 0, 0, 9, 0], [9.0, 8, 0, 0, 0], [0.0] * 5]), rows,
                                   [3, 0, -1], [3], None)
    assert tokens == [[3, 1]]  # draft 3 accepted; draft 0 banned after [2, 3], so 1 is sampled


def test_constraints_leave_logprobs_raw():
    _, lps = sample(LOGITS, [row(temperature=0, logprobs=1, allowed_token_ids=[4])], None)
    assert lps[0][0].token_id == 4 and lps[0][0].rank == 5
    assert math.isclose(lps[0][0].logprob, float(LOGITS.log_softmax(-1)[0, 4]), rel_tol=1e-6)


def test_constraint_problems_name_the_field():
    p = SamplingParams(logit_bias={7: 1.0, 1: 101.0}, allowed_token_ids=[], bad_words=[""],
                       bad_words_token_ids=[[], [1, 9]]).problems(vocab_size=5)
    text = " ".join(p)
    for piece in ("logit_bias token ids [7]", "logit_bias values must be in [-100, 100], got [101.0]",
                  "allowed_token_ids must not be empty", "bad_words must not be empty",
                  "bad_words_token_ids must not hold an empty", "bad_words_token_ids [9]"):
        assert piece in text
    assert SamplingParams(logit_bias={4: -100.0}, allowed_token_ids=[0, 4], bad_words=["x"],
                          bad_words_token_ids=[[1, 2]]).problems(vocab_size=5) == []


def test_token_history_folds_only_new_tokens_and_matches_a_fresh_count():
    """A worker's history, carried across steps (tokens appended, requests dropped and readmitted,
    slots reused), penalizes exactly as counting each row afresh does."""
    g = torch.Generator().manual_seed(0)
    vocab = 50
    params = [SamplingParams(temperature=0, repetition_penalty=1.7, frequency_penalty=0.4),
              SamplingParams(temperature=0, presence_penalty=1.1),
              SamplingParams(temperature=0.9, seed=3, frequency_penalty=-0.5, repetition_penalty=0.8)]
    history = TokenHistory(vocab)
    reqs = {f"r{i}": torch.randint(0, vocab, (5 + i,), generator=g).tolist() for i in range(6)}
    for step in range(30):
        ids = sorted(reqs)
        rows = [SampleRow(rid, params[int(rid[1:]) % 3], reqs[rid], 3) for rid in ids]
        logits = torch.randn(len(rows), vocab, generator=g)
        kept, _ = sample(logits, rows, None, history=history)
        fresh, _ = sample(logits, [SampleRow(r.req_id, r.params, list(r.token_ids), 3) for r in rows], None)
        assert kept == fresh, step
        for r, t in zip(rows, kept):
            r.token_ids.append(t)
        if step % 7 == 6:  # one ends, a new one comes, one is readmitted with a new token list
            gone = ids[step % len(ids)]
            history.forget([gone])
            del reqs[gone]
            reqs[f"r{step}"] = torch.randint(0, vocab, (4,), generator=g).tolist()
            again = ids[(step + 1) % len(ids)]
            reqs[again] = list(reqs[again])
    assert len(history) == len(reqs) and history.seen.shape[0] <= 8  # slots were reused


def test_penalties_count_the_drafts_before_each_verification_row():
    logits = torch.tensor([[2.0, 1.9, 0.0, 0.0], [2.0, 1.9, 0.0, 0.0]])
    base = SampleRow("p", SamplingParams(temperature=0, presence_penalty=1.0), [3, 3], 1)
    tokens, _ = speculative_sample(logits, draft_rows(base, [0]), [0, -1], [2], None)
    assert tokens == [[0, 1]]  # draft 0 accepted, then 0 is penalized: 2.0 - 1 < 1.9


def test_the_highest_uniform_still_draws_a_token_with_mass():
    from model.sampler import _draw, row_uniforms
    top = max(max(row_uniforms(s)[1] for s in range(20000)), (2**24 - 1) * 2.0**-24 * (1 - 2.0**-22))
    for probs in ([0.3, 0.7, 0.0, 0.0], [1e-8] * 7 + [1 - 7e-8] + [0.0] * 3):
        p = torch.tensor([probs], dtype=torch.float32)
        _, drawn = _draw(p.clone(), torch.tensor([-1]), torch.tensor([[0.5, top]]))
        assert p[0, int(drawn)] > 0


def test_constraints_that_leave_no_token_are_dropped_for_that_row():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.0, 3.0, 1.0, 2.0]])
    contradiction = dict(allowed_token_ids=[2], bad_words_token_ids=[[2]])
    for temperature in (0, 1.0):
        rows = [SampleRow("a", SamplingParams(temperature=temperature, seed=1, **contradiction), [1], 1),
                SampleRow("b", SamplingParams(temperature=temperature, seed=1, allowed_token_ids=[2]), [1], 1)]
        tokens, _ = sample(logits, rows, None)
        assert 0 <= tokens[0] < 4 and tokens[1] == 2
    assert sample(logits[:1], [SampleRow("a", SamplingParams(temperature=0, **contradiction), [1], 1)], None)[0] == [1]


def test_every_penalty_in_range_draws_a_token_in_the_vocabulary():
    """A repetition penalty of 1e-300 once made every logit the prompt held +inf (1/penalty in
    float32), the softmax NaN and the draw the vocabulary's size: the next step's embedding
    raised and the engine failed for everyone. Such values are refused by name, every value in
    range draws an in-vocabulary token, and a row whose edits still overflow samples unedited."""
    assert "repetition_penalty must be in [0.01, 100], got 1e-300" in " ".join(
        SamplingParams(repetition_penalty=1e-300).problems(5))
    assert SamplingParams(repetition_penalty=1e300).problems(5)
    logits = torch.randn(4, 300) * 20
    for penalty in (0.01, 0.5, 1.0, 2.0, 100.0):
        for temperature in (0.0, 1e-6, 1.0, 1e30):
            kw = dict(repetition_penalty=penalty, frequency_penalty=2.0, presence_penalty=-2.0,
                      logit_bias={5: 100.0}, temperature=temperature, seed=3)
            assert not SamplingParams(**kw).problems(300)
            rows = [SampleRow(f"r{i}", SamplingParams(**kw), list(range(0, 300, 3)), 50) for i in range(4)]
            tokens, _ = sample(logits, rows, None)
            assert all(0 <= t < 300 for t in tokens), (penalty, temperature, tokens)
    # Past the bounds (as a direct caller could ask): the overflowing rows sample unedited, the others edited.
    rows = [SampleRow("inf", SamplingParams(repetition_penalty=1e-300, seed=1), [0, 1, 2], 1),
            SampleRow("ok", SamplingParams(temperature=0, allowed_token_ids=[7]), [0], 1)]
    tokens, _ = sample(logits[:2], rows, None)
    assert 0 <= tokens[0] < 300 and tokens[1] == 7


def reference_kept(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The definition, by sorting the whole row: top-k, then top-p over the top-k tokens'
    renormalized distribution (keeping at least one), then min-p against the top probability."""
    values, order = logits.sort(descending=True)
    k = top_k if top_k > 0 else len(values)
    probs = values[:k].softmax(-1)
    n = int(((probs.cumsum(-1) - probs) < top_p).sum()) if top_p < 1 else k
    kept = order[:n]
    return {int(t) for t in kept if min_p == 0 or logits[t].exp() >= min_p * logits.max().exp()}


def test_top_k_top_p_from_the_head_equal_a_whole_sort(monkeypatch):
    """Fresh random rows, peaked (the nucleus inside the head) and flat (it is not: the whole row
    is sorted), with every mix of top-k (within the head, selected beyond it, too large to
    select), top-p, min-p and temperature, in one batch. The kept tokens equal the definition's."""
    import model.sampler as sampler
    monkeypatch.setattr(sampler, "_HEAD", 32)
    monkeypatch.setattr(sampler, "_LARGEST_SELECTED_TOP_K", 100)
    vocab = 1500
    g = torch.Generator().manual_seed(3)
    settings = [(0, 0.9, 0.0), (10, 1.0, 0.0), (10, 0.5, 0.0), (80, 0.95, 0.0), (400, 0.9, 0.0),
                (0, 1.0, 0.0), (0, 0.8, 0.05), (0, 1.0, 0.2), (1, 0.3, 0.0)]
    rows, logits = [], []
    for scale in (8.0, 0.3):
        for temperature in (1.0, 0.7):
            for k, p, m in settings:
                rows.append(SampleRow(f"r{len(rows)}", SamplingParams(temperature=temperature, top_k=k, top_p=p,
                                                                      min_p=m), [0], 1))
                logits.append(torch.randn(vocab, generator=g) * scale)
    logits = torch.stack(logits)
    head = logits.topk(32, dim=-1).values
    ks = torch.tensor([vocab] * len(rows))
    settled = sampler._cutoffs_in(head, ks, torch.full((len(rows),), 0.9), vocab, logits.logsumexp(-1))[1]
    assert settled[:len(rows) // 2].all() and not settled[len(rows) // 2:].any()  # both paths run
    filtered = sampler._filter(logits, rows)
    for i, r in enumerate(rows):
        expected = reference_kept(logits[i] / r.params.temperature, r.params.top_k, r.params.top_p, r.params.min_p)
        assert set(torch.isfinite(filtered[i]).nonzero()[:, 0].tolist()) == expected, (i, r.params)
        assert torch.equal(filtered[i][list(expected)], logits[i][list(expected)] / r.params.temperature)


def test_truncate_prompt_keeps_the_last_tokens_or_what_the_context_holds():
    from engine.sampling_params import truncate_prompt
    ids = list(range(10))
    assert truncate_prompt(ids, SamplingParams(truncate_prompt_tokens=3), 100) == [7, 8, 9]
    assert truncate_prompt(ids, SamplingParams(truncate_prompt_tokens=30), 100) == ids
    assert truncate_prompt(ids, SamplingParams(truncate_prompt_tokens=-1), 5) == [6, 7, 8, 9]  # room for one more
    assert truncate_prompt(ids, SamplingParams(), 5) == ids  # the engine refuses it, naming the length
    assert truncate_prompt(ids, SamplingParams(truncate_prompt_tokens=0), 5) == ids  # refused, naming the field
    assert SamplingParams(truncate_prompt_tokens=-2).problems(50) == [
        "truncate_prompt_tokens must be -1 (the context) or at least 1, got -2"]


def test_the_bad_words_index_bans_what_the_definition_bans():
    """The definition: a sequence's last token is banned where the output ends with the rest."""
    rng = random.Random(0)
    for _ in range(300):
        seqs = [[rng.randrange(4) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 12))]
        output = [rng.randrange(4) for _ in range(rng.randint(0, 6))]
        drafts_at = rng.randint(0, len(output))
        prompt = [rng.randrange(4) for _ in range(3)]
        want = sorted(s[-1] for s in seqs if len(s) - 1 <= len(output) and output[len(output) - len(s) + 1:] == s[:-1])
        got = _banned_by_bad_words(BadWordsIndex(seqs), prompt + output[:drafts_at], len(prompt), output[drafts_at:])
        assert sorted(got) == want, (seqs, output, drafts_at)


def test_plain_greedy_verification_equals_the_general_path():
    """greedy_verify (the worker's path when every row is plain greedy) emits what
    speculative_sample does, over groups of 1 to 4 rows with drafts accepted, rejected and tied."""
    rng = random.Random(7)
    torch.manual_seed(7)
    for _ in range(30):
        sizes = [rng.randint(1, 4) for _ in range(rng.randint(1, 12))]
        logits = torch.randn(sum(sizes), 40)
        logits[:, 5] = logits[:, 9] = 9.0  # ties: the first of them is the argmax on both paths
        best = logits.argmax(-1).tolist()
        drafts = []
        for size in sizes:
            start = len(drafts)
            drafts += [best[start + j] if rng.random() < 0.7 else rng.randrange(40) for j in range(size - 1)] + [-1]
        params = SamplingParams(temperature=0.0)
        assert params.plain_greedy
        rows = [SampleRow("r", params, [1, 2, 3], 2) for _ in drafts]
        expected, _ = speculative_sample(logits, rows, drafts, sizes, eos_token_id=None)
        assert greedy_verify(logits, drafts, sizes) == expected


def test_plain_greedy_excludes_every_parameter_that_edits_or_reads_the_logits():
    assert SamplingParams(temperature=0.0).plain_greedy
    for edit in [dict(temperature=0.5), dict(logprobs=1), dict(logit_bias={3: 1.0}), dict(allowed_token_ids=[3]),
                 dict(bad_words_token_ids=[[3]]), dict(min_tokens=2), dict(repetition_penalty=1.1),
                 dict(frequency_penalty=0.5), dict(presence_penalty=0.5),
                 dict(structured_outputs=StructuredOutputsParams(regex="a+"))]:
        assert not SamplingParams(**{"temperature": 0.0, **edit}).plain_greedy, edit
