"""The engine through its real processes: scheduler and worker over ZeroMQ, offline API."""

import os
import signal
import time

import msgspec
import pytest
import torch

from engine import LLM, SamplingParams
from entrypoints.engine_client import EngineDeadError
from model.hf_reference import load_hf_model
from tests.process_util import gone

BLOCK = 16
FP32_BYTES_PER_BLOCK = 576 * 4 * 4 * BLOCK  # 576 values x fp32 x (3 layers + MTP) x tokens


def _prompts():
    g = torch.Generator().manual_seed(11)
    lengths = [3, 90, 20, 7, 60, 33]
    return [torch.randint(2, 258, (n,), generator=g).tolist() for n in lengths]


MAX_TOKENS = [12, 30, 8, 40, 20, 25]


@pytest.fixture(scope="module")
def small_cache_llm(tiny_checkpoint):
    # 14 blocks of 16 tokens hold the longest request alone, but not the batch: preemption happens.
    llm = LLM(tiny_checkpoint, dtype="float32", block_size=BLOCK, max_num_batched_tokens=48,
              kv_cache_memory=14 * FP32_BYTES_PER_BLOCK)
    yield llm
    llm.shutdown()


def test_greedy_mixed_batch_equals_transformers_with_chunking_and_preemption(small_cache_llm, tiny_checkpoint):
    prompts = _prompts()
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    before = small_cache_llm.stats()
    outs = small_cache_llm.generate(prompts, params, use_tqdm=False)
    after = small_cache_llm.stats()
    assert after.num_preemptions > before.num_preemptions
    hf = load_hf_model(tiny_checkpoint)
    with torch.inference_mode():
        for p, m, out in zip(prompts, MAX_TOKENS, outs):
            ref = hf.generate(torch.tensor([p]), max_new_tokens=m, min_new_tokens=m, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            assert out.token_ids == ref and out.finish_reason == "length"
    assert after.num_free_blocks == after.num_blocks and after.num_running == 0


def test_planning_each_step_after_the_last_returns_gives_the_same_tokens(small_cache_llm, tiny_checkpoint):
    """The default engine plans step N+1 while step N runs; without that, each step waits for
    the last. Same seeded samples and the same greedy tokens, preemption included."""
    prompts = _prompts()
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=m, ignore_eos=True) for i, m in enumerate(MAX_TOKENS)]
    params[1] = SamplingParams(temperature=0, max_tokens=MAX_TOKENS[1], ignore_eos=True)
    pipelined = small_cache_llm.generate(prompts, params, use_tqdm=False)
    with LLM(tiny_checkpoint, dtype="float32", block_size=BLOCK, max_num_batched_tokens=48,
             kv_cache_memory=14 * FP32_BYTES_PER_BLOCK, async_scheduling=False) as llm:
        before = llm.stats()
        stepwise = llm.generate(prompts, params, use_tqdm=False)
        assert llm.stats().num_preemptions > before.num_preemptions
    assert [o.token_ids for o in stepwise] == [o.token_ids for o in pipelined]


def test_prefix_cache_computes_only_new_tokens_and_keeps_output(tiny_checkpoint):
    """Then four prompts behind the same cached prefix in one step: their prefill chunks expand
    the shared rows once (kernels/mla_attention.py) and give the tokens of an engine without the
    cache."""
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(2, 258, (80,), generator=g).tolist()
    first = prefix + [10, 11, 12]
    seconds = [prefix + torch.randint(2, 258, (n,), generator=g).tolist() for n in (2, 12, 20, 30)]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with LLM(tiny_checkpoint, dtype="float32", block_size=BLOCK, kv_cache_memory=64 * FP32_BYTES_PER_BLOCK) as llm:
        llm.generate([first], greedy, use_tqdm=False)
        before = llm.stats()
        cached = llm.generate(seconds, greedy, use_tqdm=False)
        after = llm.stats()
    assert after.computed_prompt_tokens - before.computed_prompt_tokens == sum(len(p) - 80 for p in seconds)
    assert after.prefix_cache_hits - before.prefix_cache_hits == 4 * 80
    assert all(c.metrics.num_cached_tokens == 80 for c in cached)
    with LLM(tiny_checkpoint, dtype="float32", block_size=BLOCK, enable_prefix_caching=False,
             kv_cache_memory=64 * FP32_BYTES_PER_BLOCK) as llm:
        plain = llm.generate(seconds, greedy, use_tqdm=False)
    assert [c.token_ids for c in cached] == [p.token_ids for p in plain]


def test_max_model_len_bounds_what_is_served(tiny_checkpoint):
    """A context shorter than the model's: a prompt that fills it fails alone, naming it, and a
    generation ends with "length" where prompt and output reach it."""
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    with LLM(tiny_checkpoint, dtype="float32", block_size=BLOCK, max_model_len=48,
             kv_cache_memory=64 * FP32_BYTES_PER_BLOCK) as llm:
        assert llm.engine.ready.max_model_len == 48
        outs = llm.generate([[5] * 48, [5] * 40], greedy, use_tqdm=False)
    assert outs[0].finish_reason == "error" and "the model's context is 48 tokens" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 8


@pytest.mark.parametrize("prompt, params, message", [
    ([], {}, "prompt is empty"),
    ([5] * 5000, {}, "prompt has 5000 tokens; the model's context is 4096"),
    ([5, 999], {}, r"prompt token ids \[999\] are outside the vocabulary"),
    ([5], {"max_tokens": 0}, "max_tokens must be in \\[1, "),
    ([5], {"temperature": -1.0}, "temperature must be >= 0"),
    ([5], {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ([5], {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ([5], {"bogus": 1}, "unknown field `bogus`"),
    ([5], {"n": 0}, r"n must be in \[1, 256\]"),
    ([5] * 5000, {"n": 3}, "prompt has 5000 tokens"),
    ([5] * 5000, {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be -1 .* or at least 1, got 0"),
    # Values every range check passes by comparing false, or that cannot cross a process boundary again.
    ([5], {"temperature": float("nan")}, "temperature must be a finite number, got nan"),
    ([5], {"repetition_penalty": float("nan")}, "repetition_penalty must be a finite number"),
    ([5], {"top_p": float("inf")}, "top_p must be a finite number, got inf"),
    ([5], {"presence_penalty": float("-inf")}, "presence_penalty must be a finite number"),
    ([5], {"seed": 2**64 - 1, "n": 2}, "seed must be a 64-bit signed integer"),
    ([5], {"max_tokens": 2**63}, r"max_tokens must be in \[1, 2147483647\]"),
    ([5], {"stop": ["x"] * 129}, r"Expected `array` of length <= 128 - at `\$.stop`"),
    ([5], {"logit_bias": {5: float("nan")}}, r"logit_bias values must be in \[-100, 100\], got \[nan\]"),
    (1.5, {}, "a prompt is a string or a list of token ids, got float"),
    ([5, "x"], {}, "a prompt is a string or a list of token ids"),
    ([5, -1], {}, r"prompt token ids \[-1\] are outside the vocabulary"),
])
def test_bad_input_fails_that_request_alone(small_cache_llm, prompt, params, message):
    good = SamplingParams(temperature=0, max_tokens=4)
    outs = small_cache_llm.generate([[7, 8, 9], prompt, [10, 11]], [good, params, good], use_tqdm=False)
    assert outs[1].finish_reason == "error" and all(c.finish_reason == "error" for c in outs[1].outputs)
    assert len(outs[1].outputs) == params.get("n", 1) or params.get("n") == 0
    assert outs[1].error is not None and pytest.importorskip("re").search(message, outs[1].error)
    assert [len(o.token_ids) for o in (outs[0], outs[2])] == [4, 4]
    assert outs[0].finish_reason == outs[2].finish_reason == "length"


def test_seeded_sampling_is_the_same_whatever_the_batch(small_cache_llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = small_cache_llm.generate([[5, 6, 7]], p, use_tqdm=False)[0].token_ids
    crowd = small_cache_llm.generate([[9] * 30, [5, 6, 7], [4] * 8],
                                     [SamplingParams(temperature=0.7, max_tokens=20), p,
                                      SamplingParams(max_tokens=5)], use_tqdm=False)
    assert crowd[1].token_ids == alone
    other_seed = small_cache_llm.generate([[5, 6, 7]], SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert other_seed.token_ids != alone


def test_n_completions_share_the_prompt_and_equal_requests_seeded_seed_plus_index(small_cache_llm):
    """n = 4 over a 40-token prompt (2 full blocks of 16): the prompt is computed once; the
    other three completions start from those blocks and a copy of the first one's third block,
    and compute only the last prompt token. Completion i draws exactly what the same request
    with n = 1 and seed 7 + i draws, logprobs included; the prompt's logprobs come once."""
    prompt = torch.randint(2, 258, (40,), generator=torch.Generator().manual_seed(23)).tolist()
    params = dict(temperature=1.0, top_k=40, max_tokens=10, ignore_eos=True, logprobs=1)
    before = small_cache_llm.stats()
    group = small_cache_llm.generate([prompt], SamplingParams(n=4, seed=7, prompt_logprobs=1, **params),
                                     use_tqdm=False)[0]
    after = small_cache_llm.stats()
    assert after.computed_prompt_tokens - before.computed_prompt_tokens == 40 + 3 * 1
    assert after.prefix_cache_hits - before.prefix_cache_hits == 3 * 39
    assert [c.index for c in group.outputs] == [0, 1, 2, 3] and group.finished
    assert len(group.prompt_logprobs) == 40 and group.text == group.outputs[0].text
    alone = small_cache_llm.generate([prompt] * 4, [SamplingParams(seed=7 + i, **params) for i in range(4)],
                                     use_tqdm=False)
    for c, a in zip(group.outputs, alone):
        assert c.token_ids == a.token_ids and c.finish_reason == "length"
        assert [lp.logprob for lp in c.logprobs] == pytest.approx([lp.logprob for lp in a.logprobs], abs=1e-4)
    assert len({tuple(c.token_ids) for c in group.outputs}) > 1
    greedy = small_cache_llm.generate([prompt, prompt], [SamplingParams(n=3, temperature=0, max_tokens=6),
                                                         SamplingParams(temperature=0, max_tokens=6)],
                                      use_tqdm=False)
    assert [c.token_ids for c in greedy[0].outputs] == [greedy[1].token_ids] * 3


def test_a_stop_string_ends_only_the_completion_that_reached_it(small_cache_llm):
    prompt = [9, 8, 7, 6, 5]
    params = dict(n=4, temperature=1.0, seed=3, max_tokens=20, ignore_eos=True, skip_special_tokens=True)
    texts = [c.text for c in small_cache_llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0].outputs]
    stop = next(texts[0][i] for i in range(3, len(texts[0])) if texts[0][i] != "\ufffd")
    assert any(stop not in t for t in texts[1:]), "pick a seed where some completion never meets the stop"
    outs = small_cache_llm.generate([prompt], SamplingParams(stop=[stop], **params), use_tqdm=False)[0].outputs
    for t, c in zip(texts, outs):
        if stop in t:
            assert c.finish_reason == "stop" and c.text == t[: t.index(stop)]
        else:
            assert c.finish_reason == "length" and c.text == t


def test_stop_token_and_min_tokens(small_cache_llm):
    greedy = small_cache_llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    stop_at = greedy.token_ids[3]
    first = greedy.token_ids.index(stop_at)
    out = small_cache_llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10,
                                                               stop_token_ids=[stop_at]), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids == greedy.token_ids[: first + 1]


def test_logit_bias_allowed_token_ids_and_bad_words(small_cache_llm):
    llm = small_cache_llm
    allowed = [40, 41, 42, 77]
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    favored = next(t for t in range(3, 250) if t not in greedy[0].token_ids)
    # a generated token that is a word of its own (one printable token)
    token = next(t for t in greedy[0].token_ids[1:] if llm.tokenizer.decode([t]).isprintable()
                 and llm.tokenizer.encode(llm.tokenizer.decode([t]), add_special_tokens=False).ids == [t])
    cut = greedy[0].token_ids.index(token)
    word = llm.tokenizer.decode([token])
    outs = llm.generate([prompts[0]] * 5 + [prompts[1]], [
        SamplingParams(temperature=1.0, seed=3, max_tokens=12, allowed_token_ids=allowed, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=4, max_tokens=12, allowed_token_ids=allowed, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, logit_bias={favored: 100.0}, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, bad_words=[word], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=["x"], allowed_token_ids=[1 << 30]),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    ], use_tqdm=False)
    for out in outs[:2]:
        assert len(out.token_ids) == 12 and set(out.token_ids) <= set(allowed)
        assert len({t for o in outs[:2] for t in o.token_ids}) > 1
    assert outs[2].token_ids == [favored] * 12
    assert token not in outs[3].token_ids and outs[3].token_ids[:cut] == greedy[0].token_ids[:cut]
    assert outs[4].finish_reason == "error" and "allowed_token_ids [1073741824] are outside" in outs[4].error
    assert outs[5].token_ids == greedy[1].token_ids  # the rest of the batch is untouched


def test_priority_policy_runs_the_lowest_value_first_and_fcfs_refuses_priorities(tiny_checkpoint, small_cache_llm):
    """One sequence at a time. Whichever requests arrived before the first step, the first one
    admitted is one of them; the others arrive while it runs its 24 tokens, and from then on the
    rest finish in priority order (never arrival order, for these priorities), with the tokens
    an FCFS engine gives."""
    prompts = [[7, 8, 9], [10, 11], [12, 13, 14], [15]]
    priority = [3, 2, 0, 1]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(tiny_checkpoint, dtype="float32", block_size=BLOCK, max_num_seqs=1, scheduling_policy="priority") as llm:
        outs = llm.generate(prompts, params, use_tqdm=False, priority=priority)
    finished = sorted(range(4), key=lambda i: outs[i].metrics.finish_time)
    assert finished[1:] == sorted(finished[1:], key=lambda i: priority[i])
    fcfs = small_cache_llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in fcfs]
    refused = small_cache_llm.generate(prompts[:2], params, use_tqdm=False, priority=[0, 1])
    assert refused[0].token_ids == fcfs[0].token_ids
    assert refused[1].finish_reason == "error" and "scheduling_policy 'priority'" in refused[1].error
    with pytest.raises(ValueError, match="1 priorities for 2 prompts"):
        small_cache_llm.generate(prompts[:2], params, use_tqdm=False, priority=[0])


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(small_cache_llm):
    long = [(7 * i) % 250 + 3 for i in range(5000)]  # longer than the context
    params = SamplingParams(temperature=0, max_tokens=5)
    out = small_cache_llm.generate([long], msgspec.structs.replace(params, truncate_prompt_tokens=8), use_tqdm=False)[0]
    tail = small_cache_llm.generate([long[-8:]], params, use_tqdm=False)[0]
    assert out.prompt_token_ids == long[-8:] and out.token_ids == tail.token_ids and out.finish_reason == "length"


def test_stop_string_is_cut_from_the_text(tiny_checkpoint, small_cache_llm):
    greedy = small_cache_llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=20,
                                                                  skip_special_tokens=True), use_tqdm=False)[0]
    text = greedy.text
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    out = small_cache_llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=20, stop=[stop]),
                                   use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]


def test_logprobs_and_prompt_logprobs(small_cache_llm):
    out = small_cache_llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=3, logprobs=2,
                                                                  prompt_logprobs=1), use_tqdm=False)[0]
    assert len(out.logprobs) == 3 and len(out.prompt_logprobs) == 4 and out.prompt_logprobs[0] is None
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and lp.rank == 1 and lp.top_ids[0] == tok and len(lp.top_ids) == 2
        assert lp.logprob == pytest.approx(lp.top_logprobs[0])
    assert [e.token_id for e in out.prompt_logprobs[1:]] == [6, 7, 8]


@pytest.fixture
def fresh_llm(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, dtype="float32", block_size=BLOCK, kv_cache_memory=16 * FP32_BYTES_PER_BLOCK)
    pids = [p.pid for p in llm.engine.procs]
    assert len(pids) == 2 and not any(gone(p) for p in pids)
    yield llm, pids
    llm.shutdown()


def test_shutdown_leaves_no_process(fresh_llm):
    llm, pids = fresh_llm
    llm.shutdown()
    assert all(gone(p) for p in pids)


def test_a_dead_worker_fails_generate_and_stops_everything(fresh_llm):
    llm, pids = fresh_llm
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDeadError):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=50), use_tqdm=False)
    assert time.monotonic() - start < 30
    assert all(gone(p) for p in pids)


def test_interrupt_during_generate_stops_every_process(fresh_llm, monkeypatch):
    llm, pids = fresh_llm

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm, "_wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=5), use_tqdm=False)
    assert all(gone(p) for p in pids)
