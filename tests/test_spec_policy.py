"""The draft-length policy (scheduler/spec_policy.py) on made-up step costs: it drafts fully when
a step's time hardly grows with its rows, not at all when every row costs its share, and a
request whose drafts keep failing drafts less."""

import math

import pytest

from engine.request import Request
from engine.sampling_params import SamplingParams
from scheduler.spec_policy import SpecPolicy, StepCost, record_verification


def feed(policy: SpecPolicy, fixed: float, per_token: float, batch: int, rho: float, accepted_frac: float,
         steps: int = 60) -> list[int]:
    """Steps of `batch` decodes at the draft length the policy picks, timed by
    T(n) = fixed + per_token * n (and a prefill step or two for the curve's far end)."""
    chosen = []
    for i in range(steps):
        d = policy.plan()
        chosen.append(d)
        n = batch * (1 + d) if i % 10 else 512
        t = fixed + per_token * n
        first = batch * (1 + d) if d else 0  # an MTP pass costs rho of a main forward over as many rows
        rows = [first] + [batch] * (d - 1) if d else []
        mtp = [rho * (fixed + per_token * r) for r in rows]
        policy.on_step(n, batch, batch * d if i % 10 else 0, t, rows, mtp, t + sum(mtp) + 1e-4, d)
        outcomes = [[0] * (policy.max_drafts + 1) for _ in range(policy.max_drafts + 1)]
        outcomes[d][round(accepted_frac * d)] = batch
        policy.on_outcomes(outcomes)
    return chosen


def mostly(chosen: list[int]) -> int:
    """The draft length of most of the last 30 steps (the policy explores the others now and then)."""
    tail = chosen[-30:]
    return max(set(tail), key=tail.count)


def test_low_load_drafts_fully_and_high_load_not_at_all():
    latency_bound = SpecPolicy(3)
    assert mostly(feed(latency_bound, fixed=2e-3, per_token=1e-6, batch=1, rho=0.3, accepted_frac=1.0,
                       steps=200)) == 3
    compute_bound = SpecPolicy(3)
    assert mostly(feed(compute_bound, fixed=1e-4, per_token=5e-5, batch=256, rho=0.4, accepted_frac=1.0,
                       steps=200)) == 0


def test_fixed_policy_always_proposes_the_bound():
    fixed = SpecPolicy(2, adaptive=False)
    assert set(feed(fixed, fixed=1e-4, per_token=5e-5, batch=256, rho=0.4, accepted_frac=1.0)) == {2}


def test_exploration_costs_few_steps():
    """A draft length measured far worse is not run again; one measured close is, now and then."""
    compute_bound = SpecPolicy(2)
    chosen = feed(compute_bound, fixed=1e-4, per_token=5e-5, batch=256, rho=0.4, accepted_frac=1.0, steps=1000)
    assert sum(d != 0 for d in chosen[100:]) <= 0.05 * len(chosen[100:])


def test_a_request_whose_drafts_fail_drafts_less():
    policy = SpecPolicy(3)
    feed(policy, fixed=1e-3, per_token=3e-6, batch=64, rho=0.2, accepted_frac=1.0)
    assert policy.step_drafts > 0 and policy.theta > 0
    good, bad = Request("good", [1], SamplingParams()), Request("bad", [1], SamplingParams())
    for _ in range(20):
        record_verification(good, 3, 3)
        record_verification(bad, 3, 0)
    assert policy.drafts_for(good) == policy.step_drafts
    assert policy.drafts_for(bad) < policy.step_drafts


def test_cost_curve_takes_medians_and_extrapolates_cautiously():
    cost = StepCost()
    for _ in range(10):
        cost.add(10, 1.0)
        cost.add(100, 2.0)
    cost.add(10, 50.0)  # one descheduled step does not move the median
    assert cost(10) == 1.0 and cost(55) == pytest.approx(1.5, rel=0.05)
    assert cost(1) == pytest.approx(0.1)  # outside what was measured: proportional
    assert cost(200) == pytest.approx(4.0, rel=0.05)
    for bad in (math.nan, math.inf, -1.0, 0.0):
        cost.add(10, bad)  # ignored
    assert cost(10) == 1.0


def test_draft_lengths_are_exported_as_a_histogram():
    from engine.messages import EngineStats
    from entrypoints.metrics import _spec_decode

    stats = EngineStats(num_running=0, num_waiting=0, num_preemptions=0, num_steps=0, prompt_tokens=0,
                        computed_prompt_tokens=0, generation_tokens=0, prefix_cache_queries=0,
                        prefix_cache_hits=0, num_free_blocks=0, num_blocks=0, spec_accepted_per_pos=[0, 0],
                        spec_draft_lengths=[5, 0, 7], spec_step_draft_length=2)
    families = {f.name: f for f in _spec_decode(stats)}
    hist = families["mlaserve:spec_decode_draft_length"]
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.0": 5, "1.0": 5, "2.0": 12, "+Inf": 12}
    assert [s.value for s in hist.samples if s.name.endswith("_sum")] == [14.0]
    gauge = families["mlaserve:spec_decode_step_draft_length"]
    assert [s.value for s in gauge.samples] == [2]


def test_bad_step_times_are_ignored():
    policy = SpecPolicy(2)
    feed(policy, fixed=2e-3, per_token=1e-6, batch=1, rho=0.3, accepted_frac=1.0, steps=40)
    before = policy.estimate(2)
    for bad in (math.nan, math.inf, -1.0):
        policy.on_step(3, 1, 2, bad, [3], [bad], bad, 2)
        policy.on_step(3, 1, 2, 1e-3, [3], [bad], 1.0, 2)
    assert policy.estimate(2) == before and policy.plan() in (0, 1, 2)


def test_a_position_not_tried_keeps_its_measured_acceptance():
    """While only the first draft runs, the second's estimate stays as last measured: it must not
    drift back to the prior and make the longer draft length look better than it was."""
    policy = SpecPolicy(2)
    two_drafts = [[0] * 3 for _ in range(3)]
    two_drafts[2][1], two_drafts[2][2] = 50, 50  # second position accepted half the time
    for _ in range(20):
        policy.on_outcomes(two_drafts)
    second = policy.acceptance(1)
    assert second == pytest.approx(0.5, abs=0.02)
    one_draft = [[0] * 3 for _ in range(3)]
    one_draft[1][1] = 100
    for _ in range(500):
        policy.on_step(100, 100, 100, 1e-3, [200], [1e-4], 2e-3, 1)
        policy.on_outcomes(one_draft)
    assert policy.acceptance(1) == second
    assert policy.acceptance(0) > 0.99


def test_a_request_drafting_like_the_rest_drafts_the_chosen_length():
    """Where drafting barely pays (the MTP pass costs nearly a main forward), theta comes near the
    acceptance itself: a request with a failure or two must still draft what the step chose, or
    the length chosen is never the length run (nor measured)."""
    policy = SpecPolicy(1)
    feed(policy, fixed=2e-3, per_token=1e-6, batch=1, rho=0.95, accepted_frac=1.0, steps=100)
    assert policy.step_drafts == 1 and policy.theta > 0.0
    req = Request("r", [1], SamplingParams())
    for i in range(20):
        record_verification(req, 1, 0 if i in (4, 9) else 1)
    assert policy.drafts_for(req) == 1
    failing = Request("f", [1], SamplingParams())
    for _ in range(20):
        record_verification(failing, 1, 0)
    assert policy.drafts_for(failing) == 0
    # ... not for good: while it drafts none its record fades, and it is tried again.
    assert 1 in [policy.drafts_for(failing) for _ in range(40)]


def test_only_decode_steps_teach_the_first_pass_cost():
    """A first pass over prompt chunks runs its layer over the few rows that draft: its time
    says nothing about a decode step of as many rows, which is what M1 estimates."""
    policy = SpecPolicy(1)
    policy.on_step(600, 4, 0, 5e-3, [600], [1e-4], 0.0, 1)  # 4 prompts end among 600 tokens
    assert not policy.first_draft_cost.known
    policy.on_step(512, 256, 256, 5e-3, [512], [2e-3], 0.0, 1)
    assert policy.first_draft_cost(512) == pytest.approx(2e-3)


def test_a_burst_of_arrivals_is_planned_for_the_batch_it_will_decode():
    """Drafting pays at the last step's batch of 2 but not at 256: steps that prefill a burst of
    256 arrivals take the choice for 256 (no MTP entries made that its decode would not use)."""
    policy = SpecPolicy(2)
    assert mostly(feed(policy, fixed=2e-3, per_token=2e-5, batch=2, rho=0.4, accepted_frac=1.0, steps=100)) > 0
    assert policy.plan(upcoming=256) == 0
    assert policy.plan(upcoming=2) > 0  # (and the small batch's own choice is back when it is one)


def test_a_draft_length_never_run_is_tried_where_it_may_pay():
    """Drafting off since start (the first pass never measured): at batch 1 on a latency-bound
    step the first pass is guessed as dear as the main forward over a row a request, which is
    close enough to no drafts to be run, measured, and kept."""
    policy = SpecPolicy(2)

    def forward(n: int) -> float:
        return 2e-3 + 1e-6 * n
    for i in range(40):  # decode steps without drafts, and prefill steps for the curve's far end
        n = 1 if i % 10 else 512
        policy.on_step(n, 1 if n == 1 else 0, 0, forward(n), [], [], forward(n) + 1e-4 if n == 1 else 0.0, 0)
    assert not policy.first_draft_cost.known
    chosen = feed(policy, fixed=2e-3, per_token=1e-6, batch=1, rho=0.4, accepted_frac=1.0, steps=60)
    assert mostly(chosen) > 0
