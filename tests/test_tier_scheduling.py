"""The prefix cache's lower tiers as the scheduler plans them (cache/tiers.py), with a fake worker
whose cache, host slots and disk files hold token ids: every token a step attends to must be in
its slot, whatever came back from host memory or disk, and the invariants hold after every step."""

import random

import pytest

from cache.block_manager import BlockManager
from cache.tiers import PrefixTiers
from engine.messages import StepResult
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.worker_state import WorkerState
from scheduler.scheduler import Scheduler, SchedulerConfig
from tests.test_scheduler import add_random_traffic, check_worker_mirrors_scheduler, write_and_check_cache


class FakeTiers:
    """The worker's side: host slots and disk files of token ids; reads finish a few steps later
    (or fail, when `fail_reads` says so or the file is gone)."""

    def __init__(self, bs: int, rng: random.Random, fail_reads: float = 0.0, disk: dict | None = None):
        self.bs, self.rng, self.fail_reads = bs, rng, fail_reads
        self.host: dict[int, list] = {}
        self.disk: dict[bytes, list] = {} if disk is None else disk
        self.reads: list[tuple[bytes, int, list[int]]] = []

    def apply(self, plan, cache: dict) -> None:
        bs = self.bs
        for b, s in zip(plan.offload_blocks, plan.offload_slots):
            self.host[s] = [cache.get((b, o)) for o in range(bs)]
        for s, b in zip(plan.load_slots, plan.load_blocks):
            for o, tok in enumerate(self.host[s]):
                cache[(b, o)] = tok
        for i, (key, slot) in enumerate(zip(plan.write_keys, plan.write_slots)):
            assert self.host[slot] == plan.write_tokens[i * bs : (i + 1) * bs]
            self.disk[key] = list(self.host[slot])
        for key in plan.delete_keys:
            self.disk.pop(key, None)
        for i, (key, slot) in enumerate(zip(plan.read_keys, plan.read_slots)):
            self.reads.append((key, slot, plan.read_tokens[i * bs : (i + 1) * bs]))

    def report(self, result: StepResult, all_reads: bool = False) -> None:
        keep = []
        for key, slot, tokens in self.reads:
            if not all_reads and self.rng.random() < 0.5:
                keep.append((key, slot, tokens))
            elif self.disk.get(key) == tokens and self.rng.random() >= self.fail_reads:
                self.host[slot] = list(tokens)
                result.reads_done.append(key)
            else:
                self.host[slot] = ["garbage"] * self.bs
                result.reads_failed.append(key)
        self.reads = keep


def tiered_scheduler(num_blocks, bs, host, disk, budget=32, max_seqs=8, spec=0, disk_keys=()):
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=4096, eos_token_id=1,
                          num_speculative_tokens=spec)
    return Scheduler(cfg, BlockManager(num_blocks, bs, True, record_evictions=True),
                     PrefixTiers(host, disk, bs, list(disk_keys)))


def step_once(sched, worker, tiers, cache, rng, vocab=50):
    step = sched.schedule()
    tiers.apply(step.plan, cache)
    work = worker.apply(step.plan)
    write_and_check_cache(step.plan, work, cache, sched.blocks.block_size)
    k = sched.config.num_speculative_tokens
    sampled, drafts = {}, {}
    for w in work:
        if w.samples:
            verified = w.tokens[w.num_known:]
            sampled[w.req.req_id] = verified[: rng.randint(0, len(verified))] + [rng.randrange(2, vocab)]
            drafts[w.req.req_id] = [rng.randrange(2, vocab) for _ in range(k)]
    result = StepResult(step.plan.step_id, list(sampled), list(sampled.values()),
                        [drafts[r] for r in sampled] if k else [])
    WorkerState.advance(work, sampled, drafts)
    tiers.report(result, all_reads=step.plan.await_reads)
    return step, sched.update(step, result)


def run_until_idle(sched, worker, tiers, cache, rng):
    deltas = []
    while sched.has_work():
        _, d = step_once(sched, worker, tiers, cache, rng)
        deltas += d
        sched.check_integrity()
    return deltas


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_with_tiers_attends_only_to_the_right_tokens(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 4, 8])
    spec = [0, 0, 2, 0, 3, 0][seed]
    sched = tiered_scheduler(num_blocks=48 // bs + 8 * spec, bs=bs, host=rng.choice([4, 16, 64]),
                             disk=rng.choice([0, 8, 200]), budget=rng.choice([8, 32]), spec=spec)
    tiers = FakeTiers(bs, rng, fail_reads=0.2 if seed % 2 else 0.0)
    worker, cache = WorkerState(), {}
    shared = [rng.randrange(2, 50) for _ in range(24)]
    ids, finished = set(), set()
    for added in range(200):
        ids.update(add_random_traffic(sched, rng, shared, added))
        if sched.requests and rng.random() < 0.03:
            rid = rng.choice(list(sched.requests))
            sched.abort(rid)
            finished.add(rid)
        for _ in range(rng.randrange(4)):
            _, deltas = step_once(sched, worker, tiers, cache, rng)
            finished |= {d.req_id for d in deltas if d.finished}
            sched.check_integrity()
            check_worker_mirrors_scheduler(sched, worker)
    finished |= {d.req_id for d in run_until_idle(sched, worker, tiers, cache, rng) if d.finished}
    assert finished == ids
    assert sched.blocks.num_free == sched.blocks.num_blocks
    assert all(e.pins == 0 for e in sched.tiers.host.values()), "pins left behind"
    c = sched.tiers.counters
    assert c.blocks_down > 0 and c.host_hit_tokens > 0
    if sched.tiers.disk_blocks:
        assert c.blocks_written > 0


def _conversation_turns(sched, worker, tiers, cache, rng, convs, turns, new_tokens=7, max_tokens=5):
    """Every conversation's turn t, then every turn t + 1; per turn the prompt tokens computed."""
    prompts = [list(c) for c in convs]
    computed = []
    for turn in range(turns):
        before = sched.counters.computed_prompt_tokens
        outs = {}
        for i, p in enumerate(prompts):
            sched.add(Request(f"c{i}t{turn}", p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
        for d in run_until_idle(sched, worker, tiers, cache, rng):
            outs.setdefault(d.req_id, []).extend(d.new_token_ids)
        computed.append((sched.counters.computed_prompt_tokens - before, [len(p) for p in prompts],
                         [len(outs[f"c{i}t{turn}"]) for i in range(len(prompts))]))
        prompts = [p + outs[f"c{i}t{turn}"] + [rng.randrange(2, 50) for _ in range(new_tokens)]
                   for i, p in enumerate(prompts)]
    return computed


def _expected_computed(bs, lengths, prev_lengths, prev_outputs, spec):
    total = 0
    for n, p, o in zip(lengths, prev_lengths, prev_outputs):
        blocks = min((p + o - 1) // bs, (n - 1) // bs)  # what the last turn cached, all of it kept
        if spec and blocks:
            blocks -= 1
        total += n - blocks * bs
    return total


@pytest.mark.parametrize("spec", [0, 2])
def test_returning_turns_compute_only_their_new_tokens(spec):
    """A pool that holds about one conversation (the longest: 17 blocks of 20); with host memory for all, each returning
    turn computes exactly what its last turn did not cache."""
    rng = random.Random(spec)
    bs = 4
    convs = [[rng.randrange(2, 50) for _ in range(n)] for n in (9, 14, 21, 6)]
    sched = tiered_scheduler(num_blocks=20 + 8 * spec, bs=bs, host=200, disk=0, budget=16, spec=spec)
    tiers = FakeTiers(bs, rng)
    turns = _conversation_turns(sched, WorkerState(), tiers, {}, rng, convs, 4)
    for (computed, lengths, _), (_, prev_lengths, prev_outputs) in zip(turns[1:], turns):
        assert computed == _expected_computed(bs, lengths, prev_lengths, prev_outputs, spec)
    assert sched.tiers.counters.host_hit_tokens > 0
