"""Scheduler invariants, checked after every step, with a fake model that follows the plans."""

import random

import pytest

from cache.block_manager import BlockManager
from engine.messages import StepResult
from engine.request import Request, Status
from engine.sampling_params import SamplingParams
from engine.worker_state import WorkerState
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.spec_policy import SpecPolicy

EOS = 1


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8, max_len=4096, caching=True, spec=0,
                   policy="fcfs"):
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=max_len,
                          eos_token_id=EOS, num_speculative_tokens=spec, policy=policy)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, caching))


def run_step(sched: Scheduler, worker: WorkerState, rng: random.Random, vocab=50, cache=None):
    """A fake model: random tokens; with speculation, random drafts of which a random prefix is
    accepted. `cache` (a dict): the fake model also writes each computed token into its block
    slot there and checks that every token it attends to is in its slot."""
    k = sched.config.num_speculative_tokens
    step = sched.schedule()
    work = worker.apply(step.plan)
    if cache is not None:
        write_and_check_cache(step.plan, work, cache, sched.blocks.block_size)
    sampled, drafts = {}, {}
    for w in work:
        if w.samples:
            verified = w.tokens[w.num_known:]
            assert verified == w.req.draft_ids[: w.num_drafts]
            sampled[w.req.req_id] = verified[: rng.randint(0, len(verified))] + [rng.randrange(vocab)]
            drafts[w.req.req_id] = [rng.randrange(vocab) for _ in range(k)]
    result = StepResult(step.plan.step_id, list(sampled), list(sampled.values()),
                        [drafts[r] for r in sampled] if k else [])
    WorkerState.advance(work, sampled, drafts)
    return step, sched.update(step, result)


def write_and_check_cache(plan, work, cache: dict, bs: int) -> None:
    for src, dst in zip(plan.copy_src, plan.copy_dst):
        for off in range(bs):
            if (src, off) in cache:
                cache[(dst, off)] = cache[(src, off)]
            else:
                cache.pop((dst, off), None)
    for w in work:
        req, start = w.req, w.req.num_computed
        for pos in range(start):  # what this step's tokens attend to, prefix hits included
            assert cache.get((req.block_table[pos // bs], pos % bs)) == req.token_ids[pos], (req.req_id, pos)
        for pos, tok in enumerate(w.tokens, start):
            cache[(req.block_table[pos // bs], pos % bs)] = tok


def add_random_traffic(sched: Scheduler, rng: random.Random, shared_prefix: list[int], added: int) -> list[str]:
    """One request, or now and then the completions of one prompt (SamplingParams.n); their ids."""
    n = rng.randrange(1, 40)
    prompt = (shared_prefix[: rng.randrange(0, 24)] + [rng.randrange(2, 50) for _ in range(n)])[:40]
    params = SamplingParams(max_tokens=rng.randrange(1, 30))
    priority = rng.randrange(3) if sched.config.policy == "priority" else 0
    if rng.random() < 0.2:
        group = [Request(f"r{added}/{i}", prompt, params, priority=priority) for i in range(rng.randrange(2, 5))]
        sched.add_group(group)
        return [r.req_id for r in group]
    sched.add(Request(f"r{added}", prompt, params, priority=priority))
    return [f"r{added}"]


def check_worker_mirrors_scheduler(sched: Scheduler, worker: WorkerState):
    for req in sched.running:
        w = worker.requests[req.req_id]
        assert w.block_table == req.block_table
        assert w.num_computed == req.num_computed
        assert w.token_ids == req.token_ids
    known = {r.req_id for r in sched.running} | {r.req_id for r in sched.waiting} | set(sched.pending_drops)
    assert set(worker.requests) <= known


def test_decodes_are_scheduled_before_new_prompts():
    sched = make_scheduler(budget=8)
    worker, rng = WorkerState(), random.Random(0)
    sched.add(Request("a", [2] * 6, SamplingParams(max_tokens=5)))
    run_step(sched, worker, rng)  # a prefills
    sched.add(Request("b", [3] * 20, SamplingParams(max_tokens=5)))
    step, _ = run_step(sched, worker, rng)
    assert [(r.req_id, n) for r, n in step.scheduled] == [("a", 1), ("b", 7)]  # b chunked to budget
    step, _ = run_step(sched, worker, rng)
    assert [(r.req_id, n) for r, n in step.scheduled] == [("a", 1), ("b", 7)]


def test_preemption_takes_the_most_recently_admitted_and_keeps_its_output():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64)
    worker, rng = WorkerState(), random.Random(0)
    sched.add(Request("old", [2] * 7, SamplingParams(max_tokens=20, ignore_eos=True)))
    sched.add(Request("new", [3] * 7, SamplingParams(max_tokens=20, ignore_eos=True)))
    run_step(sched, worker, rng)  # both prefilled: 2 blocks each, pool full
    run_step(sched, worker, rng)  # 8 tokens each: still fits
    step, _ = run_step(sched, worker, rng)  # "old" needs a third block: "new" is preempted
    assert sched.counters.num_preemptions == 1
    assert [r.req_id for r, _ in step.scheduled] == ["old"] and "new" in step.plan.finished_ids
    preempted = sched.waiting[0]
    assert preempted.req_id == "new" and preempted.num_output_tokens == 2 and not preempted.block_table
    sched.check_integrity()


def test_priority_policy_admits_the_lowest_value_first_then_by_arrival():
    sched = make_scheduler(max_seqs=1, policy="priority")
    worker, rng = WorkerState(), random.Random(0)
    for rid, priority in [("a", 2), ("b", 0), ("c", 1), ("d", 0)]:
        sched.add(Request(rid, [2, 3, 4], SamplingParams(max_tokens=2, ignore_eos=True), priority=priority))
    admitted = []
    while sched.has_work():
        step, _ = run_step(sched, worker, rng)
        admitted += [n.req_id for n in step.plan.new]
        sched.check_integrity()
    assert admitted == ["b", "d", "c", "a"]


@pytest.mark.parametrize("policy, victim", [("fcfs", "high"), ("priority", "low")])
def test_preemption_takes_the_lowest_priority_under_the_priority_policy(policy, victim):
    """"low" (priority 5) is admitted before "high" (priority 0); when blocks run out, first come
    first served preempts the most recently admitted, the priority policy the lowest priority.
    Back in the queue, the preempted request keeps its place among its priority's arrivals."""
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64, policy=policy)
    worker, rng = WorkerState(), random.Random(0)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    sched.add(Request("low", [2] * 7, params, priority=5 if policy == "priority" else 0))
    run_step(sched, worker, rng)
    sched.add(Request("high", [3] * 7, params))
    run_step(sched, worker, rng)
    step, _ = run_step(sched, worker, rng)  # "low" needs a third block; the pool has none
    assert sched.counters.num_preemptions == 1 and victim in step.plan.finished_ids
    assert [r.req_id for r in sched.running] == [({"low", "high"} - {victim}).pop()]
    if policy == "priority":
        sched.add(Request("later-same", [4] * 3, params, priority=5))
        sched.add(Request("later-lower", [4] * 3, params, priority=9))
        sched.add(Request("later-higher", [4] * 3, params, priority=1))
        assert [sched.waiting.popleft().req_id for _ in range(4)] == ["later-higher", "low", "later-same",
                                                                        "later-lower"]


def test_abort_frees_every_block_at_once():
    sched = make_scheduler()
    worker, rng = WorkerState(), random.Random(0)
    sched.add(Request("a", [2] * 30, SamplingParams(max_tokens=50)))
    run_step(sched, worker, rng)
    assert sched.blocks.num_free < 64
    sched.abort("a")
    sched.check_integrity()
    assert sched.blocks.num_free == 64 and not sched.has_work()


def test_prefix_hit_skips_cached_tokens():
    sched = make_scheduler(block_size=4, budget=64)
    worker, rng = WorkerState(), random.Random(0)
    prefix = list(range(2, 22))  # 20 tokens = 5 full blocks
    sched.add(Request("a", prefix + [40], SamplingParams(max_tokens=1)))
    while sched.has_work():
        run_step(sched, worker, rng)
    sched.add(Request("b", prefix + [41, 42], SamplingParams(max_tokens=1)))
    step, _ = run_step(sched, worker, rng)
    assert [(r.req_id, n) for r, n in step.scheduled] == [("b", 2)]
    assert step.plan.new[0].num_computed == 20
    assert sched.counters.prefix_cache_hits == 20


def completions(prompt, n, **params):
    """A group as EngineCore builds it for SamplingParams(n=n)."""
    return [Request(f"g/{i}", prompt, SamplingParams(**params)) for i in range(n)]


def test_completions_of_one_prompt_compute_it_once():
    """n = 3 over a 21-token prompt (5 full blocks of 4): the first completion prefills; the
    others wait until those blocks are cached, then start from them and compute one token each."""
    sched = make_scheduler(block_size=4, budget=64)
    worker, rng = WorkerState(), random.Random(0)
    prompt = list(range(2, 23))
    sched.add_group(completions(prompt, 3, max_tokens=4, ignore_eos=True))
    assert sched.num_waiting == 3 and len(sched.waiting) == 1
    step, _ = run_step(sched, worker, rng)
    assert [(r.req_id, n) for r, n in step.scheduled] == [("g/0", 21)]
    sched.check_integrity()
    step, _ = run_step(sched, worker, rng)
    assert [(r.req_id, n) for r, n in step.scheduled] == [("g/0", 1), ("g/1", 1), ("g/2", 1)]
    leader_blocks = sched.requests["g/0"].block_table[:5]
    for plan in step.plan.new:
        assert plan.num_computed == 20 and plan.block_ids[:5] == leader_blocks
    sched.check_integrity()
    assert sched.counters.computed_prompt_tokens == 21 + 1 + 1
    assert sched.counters.prefix_cache_hits == 40
    while sched.has_work():
        run_step(sched, worker, rng)
        sched.check_integrity()
    assert sched.blocks.num_free == sched.blocks.num_blocks


def test_completions_copy_the_prompt_tail_and_compute_only_its_last_token():
    """A 23-token prompt: 5 full blocks, then 2 tokens before the last in block 5. The others
    hit the 5 blocks, get a copy of the first one's block 5, and compute token 22 alone."""
    sched = make_scheduler(block_size=4, budget=64)
    worker, rng = WorkerState(), random.Random(0)
    sched.add_group(completions(list(range(2, 25)), 3, max_tokens=4, ignore_eos=True))
    run_step(sched, worker, rng)
    step, _ = run_step(sched, worker, rng)
    assert [(r.req_id, n) for r, n in step.scheduled] == [("g/0", 1), ("g/1", 1), ("g/2", 1)]
    tail = sched.requests["g/0"].block_table[5]
    assert step.plan.copy_src == [tail, tail]
    assert step.plan.copy_dst == [sched.requests[f"g/{i}"].block_table[5] for i in (1, 2)]
    assert [p.num_computed for p in step.plan.new] == [22, 22]
    assert sched.counters.computed_prompt_tokens == 23 + 1 + 1 and sched.counters.prefix_cache_hits == 44
    sched.check_integrity()


def test_completions_wait_for_the_last_chunk_of_a_chunked_prompt():
    sched = make_scheduler(block_size=4, budget=8)
    worker, rng = WorkerState(), random.Random(0)
    sched.add_group(completions(list(range(2, 23)), 2, max_tokens=2, ignore_eos=True))
    for _ in range(3):  # 21 tokens in chunks of 8
        step, _ = run_step(sched, worker, rng)
        assert [r.req_id for r, _ in step.scheduled] == ["g/0"]
    step, _ = run_step(sched, worker, rng)
    assert [(r.req_id, n) for r, n in step.scheduled] == [("g/0", 1), ("g/1", 1)]


@pytest.mark.parametrize("spec, prompt_len, held", [(0, 5, True), (0, 4, False), (2, 9, True), (2, 8, False)])
def test_completions_are_held_only_when_a_block_can_be_shared(spec, prompt_len, held):
    """A hit leaves the last prompt token uncached, and with MTP drafting also the last hit block."""
    sched = make_scheduler(block_size=4, budget=64, spec=spec)
    sched.add_group(completions(list(range(2, 2 + prompt_len)), 2))
    assert len(sched.waiting) == (1 if held else 2) and sched.num_waiting == 2


def test_completions_run_unshared_without_prefix_caching():
    sched = make_scheduler(block_size=4, budget=64, caching=False)
    worker, rng = WorkerState(), random.Random(0)
    sched.add_group(completions(list(range(2, 23)), 2))
    step, _ = run_step(sched, worker, rng)
    assert [(r.req_id, n) for r, n in step.scheduled] == [("g/0", 21), ("g/1", 21)]


@pytest.mark.parametrize("end", ["abort", "preempt"])
def test_completions_start_alone_when_the_first_one_ends_before_its_prompt_is_cached(end):
    sched = make_scheduler(num_blocks=12, block_size=4, budget=8)
    worker, rng = WorkerState(), random.Random(0)
    sched.add_group(completions(list(range(2, 23)), 3, max_tokens=2, ignore_eos=True))
    run_step(sched, worker, rng)  # g/0's first chunk
    if end == "abort":
        sched.abort("g/0")
    else:
        sched._preempt(sched.requests["g/0"])
    sched.check_integrity()
    assert sched.num_waiting == len(sched.waiting) == (2 if end == "abort" else 3)
    finished = set()
    while sched.has_work():
        _, deltas = run_step(sched, worker, rng)
        finished |= {d.req_id for d in deltas if d.finished}
        sched.check_integrity()
    assert finished == ({"g/1", "g/2"} if end == "abort" else {"g/0", "g/1", "g/2"})


def test_a_held_completion_can_be_aborted():
    sched = make_scheduler(block_size=4, budget=64)
    worker, rng = WorkerState(), random.Random(0)
    sched.add_group(completions(list(range(2, 23)), 3, max_tokens=2))
    assert sched.abort("g/1") is not None
    sched.check_integrity()
    assert sched.num_waiting == 2 and "g/1" not in sched.requests
    run_step(sched, worker, rng)
    step, _ = run_step(sched, worker, rng)
    assert [r.req_id for r, _ in step.scheduled] == ["g/0", "g/2"]


def test_a_request_that_waits_for_room_counts_its_prompt_once():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64)
    worker, rng = WorkerState(), random.Random(0)
    sched.add(Request("a", [2] * 10, SamplingParams(max_tokens=4, ignore_eos=True)))
    sched.add(Request("b", [3] * 6, SamplingParams(max_tokens=2, ignore_eos=True)))
    steps_b_waited = 0
    while sched.has_work():
        step, _ = run_step(sched, worker, rng)
        steps_b_waited += "b" in sched.requests and sched.requests["b"].status is Status.WAITING
    assert steps_b_waited >= 2
    c = sched.counters
    assert c.prompt_tokens == c.prefix_cache_queries == 16 and c.num_preemptions == 0


def test_a_request_larger_than_the_pool_finishes_instead_of_blocking():
    sched = make_scheduler(num_blocks=2, block_size=4)
    worker, rng = WorkerState(), random.Random(0)
    sched.add(Request("big", [2] * 6, SamplingParams(max_tokens=50, ignore_eos=True)))
    sched.add(Request("small", [3] * 2, SamplingParams(max_tokens=2, ignore_eos=True)))
    reasons = {}
    for _ in range(50):
        if not sched.has_work():
            break
        _, deltas = run_step(sched, worker, rng)
        reasons.update({d.req_id: d.finish_reason for d in deltas if d.finished})
        sched.check_integrity()
    assert reasons == {"big": "length", "small": "length"}


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_keeps_every_invariant(seed):
    rng = random.Random(seed)
    budget, max_seqs = rng.choice([8, 16, 64]), rng.choice([2, 4, 16])
    spec = [0, 0, 0, 0, 2, 3][seed]
    sched = make_scheduler(num_blocks=rng.choice([12, 24, 64]) + 8 * spec, block_size=rng.choice([1, 4, 16]),
                           budget=budget, max_seqs=max_seqs, caching=bool(seed % 2), spec=spec,
                           policy="priority" if seed in (1, 4) else "fcfs")
    worker = WorkerState()
    shared_prefix = [rng.randrange(2, 50) for _ in range(24)]
    added, finished, ids, cache = 0, set(), set(), {}
    for _ in range(1500):
        if added < 300 and rng.random() < 0.3:
            ids.update(add_random_traffic(sched, rng, shared_prefix, added))
            added += 1
        if sched.requests and rng.random() < 0.03:
            rid = rng.choice(list(sched.requests))
            sched.abort(rid)
            finished.add(rid)
        step, deltas = run_step(sched, worker, rng, cache=cache)
        finished |= {d.req_id for d in deltas if d.finished}
        assert step.num_tokens <= budget
        assert len(sched.running) <= max_seqs
        sched.check_integrity()
        check_worker_mirrors_scheduler(sched, worker)
    while sched.has_work():
        _, deltas = run_step(sched, worker, rng, cache=cache)
        finished |= {d.req_id for d in deltas if d.finished}
        sched.check_integrity()
    assert finished == ids
    assert sched.blocks.num_free == sched.blocks.num_blocks  # an idle engine holds no block
    assert sched.counters.num_steps > 1000
    if spec:
        c = sched.counters
        assert c.spec_num_drafts > 100 and 0 < c.spec_accepted_tokens < c.spec_draft_tokens
        assert sum(c.spec_accepted_per_pos) == c.spec_accepted_tokens


def sample_step(worker: WorkerState, step, rng: random.Random, vocab=50, cache=None, block_size=0,
                spec=0) -> StepResult:
    """The fake model runs one plan. With speculation (up to `spec` drafts) it verifies the
    drafts it holds (as many as the plan bounds), accepts a random prefix of them and proposes
    as many as the plan asks of each request."""
    work = worker.apply(step.plan)
    if cache is not None:
        write_and_check_cache(step.plan, work, cache, block_size)
    sampled, drafts = {}, {}
    for w in work:
        if w.samples:
            verified = w.tokens[w.num_known:]
            assert verified == w.req.draft_ids[: w.num_drafts] and w.propose <= step.plan.num_drafts <= spec
            emitted = sampled[w.req.req_id] = verified[: rng.randint(0, len(verified))] + [rng.randrange(vocab)]
            drafts[w.req.req_id] = [rng.randrange(vocab) for _ in range(w.propose)]
            # The MTP layer's chained drafting writes past the verified tokens: draft j's entry
            # goes at verified_end + j (engine/mtp_proposer.py); the table must hold it.
            verified_end = w.req.num_computed + w.num_known + len(emitted) - 1
            last = verified_end + w.propose - 2
            assert last < len(w.req.block_table) * block_size, (w.req.req_id, last, len(w.req.block_table))
    WorkerState.advance(work, sampled, drafts if spec else None)
    return StepResult(step.plan.step_id, list(sampled), list(sampled.values()),
                      [drafts[r] for r in sampled] if spec else [])


def synthetic_costs(policy: SpecPolicy, step, rng: random.Random, regime: float) -> None:
    """A step's measurements from a made-up cost curve: `regime` 0 is latency-bound (drafts
    pay), 1 compute-bound (they do not)."""
    n = step.num_tokens
    forward = 1e-3 + regime * 1e-4 * n + rng.random() * 1e-5
    d = step.plan.num_drafts
    rows = [n] + [step.num_sampling] * (d - 1) if d else []
    policy.on_step(n, step.num_sampling, sum(step.drafts.values()), forward, rows, [0.3 * forward] * len(rows))


@pytest.mark.parametrize("seed, spec", [(0, 0), (1, 0), (2, 0), (3, 0), (4, 2), (5, 3), (6, 1)])
def test_random_traffic_with_the_next_step_planned_before_the_last_returns(seed, spec):
    """Asynchronous scheduling: step N+1 is planned before step N's tokens are folded in, as
    EngineCore does with workers behind sockets. Preemption of a request whose token is still on
    its way, EOS while the next step is already planned, aborts: blocks, budgets and max_num_seqs
    hold after every step, every request ends, what the scheduler reports is exactly what the
    worker sampled, and no request gets a token past its max_tokens. With speculation the next
    step verifies drafts the scheduler has not seen yet (their number bounded by what it asked
    for), the adaptive policy changes the draft length as the made-up costs change, and the
    worker never writes past a request's table (the fake cache would fail)."""
    rng = random.Random(100 + seed)
    budget, max_seqs = rng.choice([8, 16, 64]), rng.choice([4, 16])
    block_size = rng.choice([1, 4, 16])
    num_blocks = (160 - 40 * bool(spec)) // block_size  # (drafts take room: fewer blocks keep preemption)
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, budget=budget, max_seqs=max_seqs,
                           caching=bool(seed % 2), policy="priority" if seed == 3 else "fcfs", spec=spec)
    policy = sched.spec = SpecPolicy(spec) if spec else None
    regime, lengths = 0.0, set()
    worker = WorkerState()
    shared_prefix = [rng.randrange(2, 50) for _ in range(24)]
    added, finished, outputs, max_tokens = 0, set(), {}, {}
    in_flight = None
    preempted_in_flight = 0
    cache = {}

    def sample(step):
        return sample_step(worker, step, rng, cache=cache, block_size=block_size, spec=spec)

    for _ in range(1500):
        if added < 300 and rng.random() < 0.3:
            for rid in add_random_traffic(sched, rng, shared_prefix, added):
                max_tokens[rid] = sched.requests[rid].params.max_tokens
            added += 1
        if sched.requests and rng.random() < 0.03:
            rid = rng.choice(list(sched.requests))
            sched.abort(rid)
            finished.add(rid)
        awaited = [r for r in sched.running if r.num_pending]
        if policy is not None:
            if rng.random() < 0.01:
                regime = 1.0 - regime
            lengths.add(policy.plan())
        upcoming = sched.schedule()
        preempted_in_flight += sum(r.status is Status.WAITING for r in awaited)
        assert upcoming.num_tokens <= budget and len(sched.running) <= max_seqs
        deltas = sched.update(*in_flight) if in_flight else []
        for d in deltas:
            outputs.setdefault(d.req_id, []).extend(d.new_token_ids)
        finished |= {d.req_id for d in deltas if d.finished}
        in_flight = (upcoming, sample(upcoming))
        if policy is not None and upcoming.scheduled:
            synthetic_costs(policy, upcoming, rng, regime)
        sched.check_integrity()
        for req in sched.running:  # the scheduler's tokens are a prefix of the worker's
            w = worker.requests[req.req_id]
            assert w.token_ids[: len(req.token_ids)] == req.token_ids and req.num_pending >= 0
    while in_flight is not None:
        deltas = sched.update(*in_flight)
        for d in deltas:
            outputs.setdefault(d.req_id, []).extend(d.new_token_ids)
        finished |= {d.req_id for d in deltas if d.finished}
        in_flight = None
        if sched.has_work():
            step = sched.schedule()
            in_flight = (step, sample(step))
        sched.check_integrity()
    assert finished == set(max_tokens)
    assert sched.blocks.num_free == sched.blocks.num_blocks
    assert preempted_in_flight > 0
    for rid, toks in outputs.items():
        assert len(toks) <= max_tokens[rid]
    if spec:
        c = sched.counters
        assert 0 < c.spec_accepted_tokens < c.spec_draft_tokens and lengths == set(range(spec + 1)), lengths
        assert sum(c.spec_accepted_per_pos) == c.spec_accepted_tokens


def test_a_reused_id_does_not_get_the_finished_requests_last_token():
    """x stops on EOS while its next step is already in flight; a new request takes the id x
    before that step's result returns. The stale token goes nowhere."""
    sched, worker = make_scheduler(budget=64), WorkerState()

    def run(step, token):
        work = worker.apply(step.plan)
        sampled = {w.req.req_id: [token] for w in work if w.samples}
        WorkerState.advance(work, sampled)
        return step, StepResult(step.plan.step_id, list(sampled), list(sampled.values()))

    sched.add(Request("x", [2, 3], SamplingParams(max_tokens=10)))
    first = run(sched.schedule(), 5)
    second = run(sched.schedule(), EOS)
    assert [d.new_token_ids for d in sched.update(*first)] == [[5]]
    third = run(sched.schedule(), 7)  # planned before x's EOS is known
    (stopped,) = sched.update(*second)
    assert stopped.finished and stopped.finish_reason == "stop"
    sched.add(Request("x", [4, 4, 4], SamplingParams(max_tokens=5)))
    fourth = run(sched.schedule(), 9)
    assert fourth[0].plan.finished_ids == ["x"] and fourth[0].plan.new[0].prompt_ids == [4, 4, 4]
    assert sched.update(*third) == []
    new_x = sched.requests["x"]
    assert new_x.token_ids == [4, 4, 4] and new_x.num_pending == 1
    assert [d.new_token_ids for d in sched.update(*fourth)] == [[9]]
    sched.check_integrity()


@pytest.mark.parametrize("acceptance", [1.0, 0.0])
def test_a_request_its_accepted_drafts_would_end_is_not_planned_again(acceptance):
    """Asynchronous scheduling with k = 2: when the step in flight verifies drafts that, if
    accepted, reach the request's max_tokens, and drafts are being accepted, the next step leaves
    it out (its rows would be dropped); where they are being rejected it is planned as before. It
    ends with its max_tokens either way."""
    sched, worker = make_scheduler(budget=64, spec=2), WorkerState()
    policy = sched.spec = SpecPolicy(2)
    outcomes = [[0] * 3 for _ in range(3)]
    outcomes[2][2 if acceptance else 0] = 100
    policy.on_outcomes(outcomes)
    sched.add(Request("x", [2, 3], SamplingParams(max_tokens=4)))
    bs = sched.blocks.block_size

    class AcceptAll(random.Random):  # the fake model accepts every draft, or none
        def randint(self, a, b):
            return b if acceptance else a

    fake = AcceptAll(0)
    first = sched.schedule()
    in_flight = (first, sample_step(worker, first, fake, spec=2, block_size=bs))
    second = sched.schedule()  # (x's prefill result not folded in yet: it verifies 2 drafts)
    assert second.scheduled and second.drafts == {"x": 2}
    tokens = [t for d in sched.update(*in_flight) for t in d.new_token_ids]
    in_flight = (second, sample_step(worker, second, fake, spec=2, block_size=bs))
    third = sched.schedule()  # x has 1 token and 1 + 2 on their way: 4 if both are accepted
    assert bool(third.scheduled) == (not acceptance)
    while True:
        for d in sched.update(*in_flight):
            tokens += d.new_token_ids
        if not sched.has_work():
            break
        step = third if third is not None else sched.schedule()
        third = None
        in_flight = (step, sample_step(worker, step, fake, spec=2, block_size=bs))
    assert len(tokens) == 4
