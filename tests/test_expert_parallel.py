"""Expert parallelism on the CPU (gloo): N worker processes as one model."""

import os
import signal
import threading
import time

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_config import ModelConfig
from entrypoints.engine_client import EngineDeadError
from kernels.routed_experts import RoutedExperts
from model.deepseek_v3 import DeepseekV3
from model.expert_parallel import ExpertParallel, expert_range
from model.loader import load_weights
from tests.process_util import gone

BLOCK = 16
FP32_BYTES_PER_BLOCK = 576 * 4 * 4 * BLOCK  # 576 values x fp32 x (3 layers + MTP) x tokens


def _batch():
    g = torch.Generator().manual_seed(21)
    lengths = [3, 70, 20, 9, 41, 12, 5, 28]
    prompts = [torch.randint(2, 258, (n,), generator=g).tolist() for n in lengths]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (6, 30, 14, 40, 9, 22, 3, 17)]
    params[4] = SamplingParams(n=3, temperature=0.9, seed=4, max_tokens=9, ignore_eos=True)  # on one rank
    return prompts, params


def _generate(checkpoint, ep_size, **options):
    prompts, params = _batch()
    # per rank: 10 blocks of 16 tokens and a budget of 32 tokens: chunked prefill, and preemption at ep 1
    with LLM(checkpoint, dtype="float32", block_size=BLOCK, max_num_batched_tokens=32,
             kv_cache_memory=10 * FP32_BYTES_PER_BLOCK, ep_size=ep_size, **options) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.stats()
        pids = [p.pid for p in llm.engine.procs]
    assert stats.num_free_blocks == stats.num_blocks
    assert all(gone(p) for p in pids)
    return [[c.token_ids for c in o.outputs] for o in outs], stats


@pytest.fixture(scope="module")
def single(tiny_checkpoint):
    return _generate(tiny_checkpoint, 1)


# EPLB: redundant slots, a re-placement due every 3 steps from the last 6 steps' load (weights
# moving between ranks while requests run); with MTP drafting 2 tokens, its layer's experts too.
EPLB_EVERY_FEW_STEPS = dict(enable_eplb=True, eplb_interval_steps=3, eplb_window_steps=6, num_speculative_tokens=2,
                            speculative_draft_policy="fixed")
GREEDY = [i for i, p in enumerate(_batch()[1]) if p.temperature == 0]  # (speculation samples the others differently)


@pytest.mark.parametrize("ep_size,options", [(2, {}), (4, dict(EPLB_EVERY_FEW_STEPS, num_redundant_experts=4))],
                         ids=["2", "4-eplb-mtp"])
def test_expert_parallel_greedy_equals_one_rank(tiny_checkpoint, single, ep_size, options):
    expected, base = single
    got, stats = _generate(tiny_checkpoint, ep_size, **options)
    if options:
        got, expected = [got[i] for i in GREEDY], [expected[i] for i in GREEDY]
    assert base.num_preemptions > 0
    assert stats.num_ranks == ep_size and all(n > 0 for n in stats.rank_requests), stats.rank_requests
    assert stats.idle_rank_steps > 0  # steps where a rank had no tokens and only served the others
    assert len(stats.routed_tokens) == 16 and min(stats.routed_tokens) > 0  # every expert got tokens
    if options:
        assert stats.eplb_rebalances >= 3 and stats.eplb_moved_slots > 0, stats
        assert sum(stats.rank_routed_tokens) > 0 and len(stats.rank_routed_tokens) == ep_size
    assert got == expected


def test_eplb_with_mtp_keeps_greedy_outputs_and_writes_the_load_file(tiny_checkpoint, single, tmp_path):
    """EP 2; the load file is written at shutdown with every MoE layer's counts, the MTP layer's
    too (tests/test_eplb.py: a start places from it)."""
    from engine.eplb import read_load_file

    expected, _ = single
    load_file = tmp_path / "expert_load.json"
    got, stats = _generate(tiny_checkpoint, 2, **EPLB_EVERY_FEW_STEPS, num_redundant_experts=2,
                           eplb_load_file=str(load_file))
    assert [got[i] for i in GREEDY] == [expected[i] for i in GREEDY]
    assert [len(c) for c in got] == [len(c) for c in expected]  # every request finished, whole
    assert stats.eplb_rebalances >= 3 and stats.eplb_moved_slots > 0, stats
    assert stats.spec_draft_tokens > 0  # (the random tiny MTP layer's drafts are verified, rarely accepted)
    counts = read_load_file(load_file, [1, 2, 3], 16)
    assert counts is not None and sorted(counts) == [1, 2, 3] and all(c.sum() > 0 for c in counts.values())


def test_each_rank_holds_only_its_experts(tiny_checkpoint):
    cfg = ModelConfig.from_checkpoint(tiny_checkpoint)
    full = load_weights(tiny_checkpoint, cfg, torch.float32)
    E, N = cfg.n_routed_experts, 4
    for rank in range(N):
        mine = expert_range(rank, N, E)
        w = load_weights(tiny_checkpoint, cfg, torch.float32, experts=mine)
        experts = {int(n.split(".mlp.experts.")[1].split(".")[0]) for n in w if ".mlp.experts." in n}
        assert experts == set(mine)
        assert set(w) - {n for n in w if ".mlp.experts." in n} == set(full) - {n for n in full if ".mlp.experts." in n}
        model = DeepseekV3(cfg, w, ep=ExpertParallel(rank, N, E))
        routed = [m for m in model.modules() if isinstance(m, RoutedExperts)]
        assert routed and all(m.first_expert == mine.start and m.num_local == len(mine) for m in routed)
        routed_bytes = sum(p.numel() * p.element_size() for m in routed for p in m.parameters())
        full_routed = sum(t.numel() * t.element_size() for n, t in full.items()
                          if ".mlp.experts." in n and int(n.split(".")[2]) < cfg.num_hidden_layers)
        assert routed_bytes * N == full_routed


def test_killing_one_worker_ends_the_engine_with_an_error_and_no_orphans(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, dtype="float32", block_size=BLOCK, kv_cache_memory=40 * FP32_BYTES_PER_BLOCK,
              ep_size=2)
    pids = [p.pid for p in llm.engine.procs]
    assert len(pids) == 3  # scheduler, two workers
    failure: list[BaseException] = []

    def run():
        try:
            llm.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=2000, ignore_eos=True), use_tqdm=False)
        except BaseException as e:  # noqa: B036 - the test inspects whatever generate raised
            failure.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(2.0)
    assert t.is_alive(), "the generation finished before a worker could be killed"
    killed = time.monotonic()
    os.kill(pids[2], signal.SIGKILL)
    t.join(timeout=30)
    assert not t.is_alive() and time.monotonic() - killed < 30
    assert failure and isinstance(failure[0], EngineDeadError), failure
    deadline = time.monotonic() + 10
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(gone(p) for p in pids)


@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
def test_expert_parallel_with_mtp_speculation_keeps_greedy_outputs(policy):
    """Ranks run the same number of MTP passes every step (idle ones serve the others' experts),
    the adaptive policy's changing draft length included (one policy plans every rank's step).
    The two ranks size their caches from available memory, so each first measures a step's peak
    (engine/memory_profile.py) at the same point of its start: its all-to-alls pair up."""
    from model.demo_checkpoint import default_model_dir
    from model.demo_task import held_out

    prompts = [p.prompt for p in held_out(5, 20, set())] + ["sort 1,2", "xyz" * 10]
    # The last request runs on alone for a while: the other rank idles through those steps.
    params = [SamplingParams(temperature=0, max_tokens=20)] * (len(prompts) - 1) + [
        SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)]
    outs = {}
    for ep, k in ((1, 0), (2, 2)):
        with LLM(default_model_dir(), dtype="float32", ep_size=ep, num_speculative_tokens=k, block_size=16,
                 max_num_batched_tokens=32, kv_cache_memory=2_000_000 if ep == 1 else None,
                 speculative_draft_policy=policy) as llm:
            outs[ep] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            stats = llm.stats()
    assert stats.idle_rank_steps > 0 and sum(stats.spec_draft_lengths[1:]) > 0
    if policy == "fixed":
        assert stats.spec_accepted_tokens > 50
    assert outs[2] == outs[1]


def _free_ports(n: int) -> int:
    """A base port with n free ports after it."""
    import socket

    for base in range(29500 + os.getpid() % 2000, 40000, 7):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def test_two_hosts_over_tcp_equal_one_rank(tiny_checkpoint, single):
    """Node 1's workers are a separate `mlaserve worker` process reaching the scheduler and the
    rendezvous over tcp, as they would from another host."""
    import subprocess
    import sys

    expected, _ = single
    base = _free_ports(5)
    common = ["--dtype", "float32", "--block-size", str(BLOCK), "--max-num-batched-tokens", "32",
              "--kv-cache-memory", str(10 * FP32_BYTES_PER_BLOCK), "--ep-size", "2", "--nnodes", "2",
              "--master-addr", "127.0.0.1", "--master-port", str(base), "--scheduler-port", str(base + 1)]
    node1 = subprocess.Popen([sys.executable, "-m", "entrypoints.cli", "worker", "--model", str(tiny_checkpoint),
                              "--node-rank", "1", *common])
    try:
        prompts, params = _batch()
        with LLM(tiny_checkpoint, dtype="float32", block_size=BLOCK, max_num_batched_tokens=32,
                 kv_cache_memory=10 * FP32_BYTES_PER_BLOCK, ep_size=2, nnodes=2, master_port=base,
                 scheduler_port=base + 1) as llm:
            assert len(llm.engine.procs) == 2  # the scheduler and rank 0's worker; rank 1 is node 1's
            got = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
            stats = llm.stats()
        assert all(n > 0 for n in stats.rank_requests)
        assert got == expected
        assert node1.wait(timeout=30) == 0  # the scheduler's shutdown ends node 1's workers
    finally:
        if node1.poll() is None:
            node1.kill()


def test_options_the_checkpoint_cannot_serve_fail_before_any_process_starts(tiny_checkpoint, tmp_path):
    import json
    import shutil

    with pytest.raises(ValueError, match="ep_size 3 does not divide the model's 16 routed experts"):
        LLM(tiny_checkpoint, ep_size=3)
    no_mtp = tmp_path / "no_mtp"
    shutil.copytree(tiny_checkpoint, no_mtp)
    cfg = json.loads((no_mtp / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0
    (no_mtp / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="needs the checkpoint's MTP module"):
        LLM(no_mtp, num_speculative_tokens=2)
    with pytest.raises(ValueError, match=r"max_model_len 5000 is longer than the model's context \(max_position_emb"):
        LLM(tiny_checkpoint, max_model_len=5000)
