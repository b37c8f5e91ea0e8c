"""MTP speculative decoding through the real processes, on the trained demo model (whose MTP
module predicts well, so drafts are accepted and the verification path really runs)."""

import random

import pytest

from engine import LLM, SamplingParams
from model.chat_tokens import ASSISTANT
from model.demo_checkpoint import default_model_dir
from model.demo_task import REASONING, Problem, held_out

BLOCK = 16
# 576 values x fp32 x (2 layers + MTP) x tokens
FP32_BYTES_PER_BLOCK = 576 * 4 * 3 * BLOCK


def chi2_critical(df: int, z: float = 3.0902) -> float:
    """Chi-square value exceeded with probability 0.001 (z: the normal quantile), by
    Wilson-Hilferty's approximation (within 1% for df >= 3)."""
    a = 2 / (9 * df)
    return df * (1 - a + z * a ** 0.5) ** 3


@pytest.fixture(scope="module")
def demo():
    return default_model_dir()


def _mixed_batch():
    """Task prompts (drafts get accepted) and long noise prompts (chunked prefill), mixed lengths."""
    rng = random.Random(5)
    prompts = [p.prompt for p in held_out(77, 18, set())]
    prompts += ["sort " + ",".join(str(rng.randrange(10)) for _ in range(n)) + "=" for n in (20, 35)]
    prompts += ["".join(rng.choice("0123456789+=,") for _ in range(n)) for n in (70, 45)]
    params = [SamplingParams(temperature=0, max_tokens=[6, 17, 30, 40][i % 4], ignore_eos=i % 3 == 0,
                             n=2 if i % 7 == 1 else 1)  # (the completions of one prompt share its blocks)
              for i in range(len(prompts))]
    return prompts, params


def _run(demo, k, prompts, params, policy="fixed", async_scheduling=True):
    # A token budget of 24 chunks the long prompts; 12 blocks cannot hold the whole batch: preemption.
    with LLM(demo, dtype="float32", block_size=BLOCK, max_num_batched_tokens=24, max_num_seqs=16,
             kv_cache_memory=12 * FP32_BYTES_PER_BLOCK, num_speculative_tokens=k, speculative_draft_policy=policy,
             async_scheduling=async_scheduling) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == 0
    return [(c.token_ids, c.finish_reason) for o in outs for c in o.outputs], stats


@pytest.fixture(scope="module")
def plain(demo):
    prompts, params = _mixed_batch()
    return _run(demo, 0, prompts, params)


@pytest.mark.parametrize("k, policy, async_scheduling", [(1, "fixed", True), (2, "fixed", True), (3, "fixed", True),
                                                       (2, "fixed", False), (2, "adaptive", True),
                                                       (3, "adaptive", True)])
def test_greedy_speculation_is_lossless_with_chunking_and_preemption(demo, plain, k, policy, async_scheduling):
    """With asynchronous scheduling (the default) the step after a verification is planned
    before its drafts are seen; the adaptive policy changes draft lengths as it measures."""
    prompts, params = _mixed_batch()
    expected, base_stats = plain
    got, stats = _run(demo, k, prompts, params, policy, async_scheduling)
    assert base_stats.num_preemptions > 0 and stats.num_preemptions > 0
    assert len(stats.spec_accepted_per_pos) == k and sum(stats.spec_accepted_per_pos) == stats.spec_accepted_tokens
    assert len(got) == len(expected) > len(prompts)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"completion {i}"
    assert stats.generation_tokens == base_stats.generation_tokens
    lengths = stats.spec_draft_lengths
    assert len(lengths) == k + 1 and sum(lengths) > 100
    if policy == "fixed":
        assert stats.spec_num_drafts > 50 and stats.spec_accepted_tokens > stats.spec_draft_tokens // 3
        assert stats.num_steps < base_stats.num_steps  # fewer steps is the point of speculation
        assert lengths[k] > 0.5 * sum(lengths)  # (fewer only near max_tokens or with no room)


def _sample_counts(demo, k, n, seed0, temperature=1.0):
    """Counts of the completions' tokens 2-4 (the first never follows a draft), each request an
    independent draw: a prompt picked at random, then seeded sampling."""
    # Unfinished questions (the chat cut before the assistant's turn): the model is unsure what
    # follows, so drafts are often rejected and the residual distribution is sampled.
    prompts = [p.prompt[: p.prompt.index(ASSISTANT)] for p in held_out(99, 40, set())]
    rng = random.Random(seed0)
    reqs = [rng.choice(prompts) for _ in range(n)]
    params = [SamplingParams(temperature=temperature, max_tokens=4, seed=seed0 + i, ignore_eos=True)
              for i in range(n)]
    with LLM(demo, dtype="bfloat16", block_size=BLOCK, num_speculative_tokens=k, speculative_draft_policy="fixed",
             kv_cache_memory=400 * FP32_BYTES_PER_BLOCK) as llm:
        outs = llm.generate(reqs, params, use_tqdm=False)
        stats = llm.stats()
    counts: dict[tuple[int, ...], int] = {}
    for o in outs:
        key = tuple(o.token_ids[1:])
        counts[key] = counts.get(key, 0) + 1
    return counts, stats


def test_sampled_token_frequencies_match_without_speculation(demo):
    """Rejection sampling keeps the main model's distribution: frequencies of the completions
    of 4000 independent temperature-1 requests with k = 2 and without, two-sample chi-square at
    p = 0.001 (different seeds: shared noise would make the samples agree beyond chance)."""
    n = 4000
    base, _ = _sample_counts(demo, 0, n, seed0=0)
    spec, stats = _sample_counts(demo, 2, n, seed0=n)
    # drafts were accepted often, and rejected often
    assert 0.1 * stats.spec_draft_tokens < stats.spec_accepted_tokens < 0.9 * stats.spec_draft_tokens
    keys = set(base) | set(spec)
    common = [key for key in keys if base.get(key, 0) + spec.get(key, 0) >= 10]
    rare_a = sum(v for key, v in base.items() if key not in common)
    rare_b = sum(v for key, v in spec.items() if key not in common)
    table = [(base.get(key, 0), spec.get(key, 0)) for key in common] + [(rare_a, rare_b)]
    total_a, total_b = sum(a for a, _ in table), sum(b for _, b in table)
    chi2 = 0.0
    for a, b in table:
        col = a + b
        if col == 0:
            continue
        ea, eb = col * total_a / (total_a + total_b), col * total_b / (total_a + total_b)
        chi2 += (a - ea) ** 2 / ea + (b - eb) ** 2 / eb
    df = len([1 for a, b in table if a + b]) - 1
    assert df >= 5, df
    assert chi2 < chi2_critical(df), (chi2, df)


def test_speculation_with_prefix_caching_stop_tokens_and_logprobs(demo):
    """A stop token inside accepted drafts truncates there; logprobs come one per returned token;
    a prefix-cache hit (its last block recomputed for the MTP layer) changes nothing."""
    comma = 2 + ord(",")
    shared = ",".join(str(d) for d in [7, 3, 9, 1, 4, 4, 0, 2, 8, 6, 5] * 2) + ","  # 46 tokens, in chats sharing more
    prompts = [Problem(d).prompt for d in (shared + "1", shared + "3", "9,8,7,1", "5,5,2,0", "5,5,2,0")]
    params = [SamplingParams(temperature=0, max_tokens=40, logprobs=2),
              SamplingParams(n=3, temperature=0, max_tokens=40),  # two of them start from the first's blocks
              SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[comma]),
              SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[comma], logprobs=1),
              SamplingParams(temperature=0, max_tokens=32, bad_words=["0,2"])]  # the drafts propose it
    runs = {}
    for k in (0, 2):
        with LLM(demo, dtype="float32", block_size=BLOCK, num_speculative_tokens=k, speculative_draft_policy="fixed",
                 kv_cache_memory=100 * FP32_BYTES_PER_BLOCK) as llm:
            first = llm.generate(prompts[:1], params[:1], use_tqdm=False)
            rest = llm.generate(prompts[1:], params[1:], use_tqdm=False)
            runs[k] = (first + rest, llm.stats())
    (plain, _), (spec, stats) = runs[0], runs[2]
    assert stats.prefix_cache_hits >= BLOCK and stats.spec_accepted_tokens > 10
    for a, b in zip(plain, spec):
        assert (a.token_ids, a.finish_reason, a.text) == (b.token_ids, b.finish_reason, b.text)
    assert [c.token_ids for c in spec[1].outputs] == [plain[1].token_ids] * 3
    assert spec[2].finish_reason == "stop" and spec[2].token_ids[-1] == comma
    assert spec[2].text == REASONING["plain"] + "</think>1,"  # the answer's first comma (sorted 9,8,7,1)
    answer = spec[4].text.split("</think>")[1]  # sorted, it would go on "0,2"
    assert answer.startswith("0,") and "0,2" not in answer
    for out in (spec[0], spec[3]):
        assert len(out.logprobs) == len(out.token_ids)
        assert [lp.token_id for lp in out.logprobs] == out.token_ids
    for a, b in zip(plain[0].logprobs, spec[0].logprobs):
        assert abs(a.logprob - b.logprob) < 1e-3
