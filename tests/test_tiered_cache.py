"""The prefix cache's host and disk tiers through the real processes (cache/tiers.py plans,
cache/tier_store.py copies): conversations whose turns come back after the pool forgot them."""

import pytest
import torch

from cache.latent_cache import LatentCache
from cache.tier_store import HEADER
from engine import LLM, SamplingParams
from model.checkpoint_maker import make_checkpoint

BLOCK = 16
LAYERS = 4  # the tiny checkpoint's 3 layers and its MTP layer
TURNS = 3
MAX_TOKENS = [12, 9, 14, 10]


def block_bytes(kv_cache_dtype: str, dtype: str = "float32") -> int:
    return BLOCK * LatentCache.bytes_per_token(LAYERS, 512, 64, getattr(torch, dtype), kv_cache_dtype == "fp8")


def engine(checkpoint, kv_cache_dtype="auto", pool_blocks=12, dtype="float32", **options) -> LLM:
    """A pool of 12 blocks: it holds any one conversation, but not the four."""
    return LLM(checkpoint, dtype=dtype, block_size=BLOCK, kv_cache_dtype=kv_cache_dtype,
               kv_cache_memory=pool_blocks * block_bytes(kv_cache_dtype, dtype), **options)


def first_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(2, 258, (n,), generator=g).tolist() for n in (20, 35, 50, 28)]


def next_prompts(prompts, outputs, turn):
    g = torch.Generator().manual_seed(100 + turn)
    return [p + o + torch.randint(2, 258, (9,), generator=g).tolist() for p, o in zip(prompts, outputs)]


def converse(llm: LLM, turns=range(TURNS), prompts=None):
    """Each turn sends every conversation's next prompt (its history, the last answer and 9 new
    tokens), one conversation after the other (so no turn is preempted, and each count is its
    own). Per turn: the prompts, the answers, what each found cached and the prompt tokens each
    computed."""
    prompts = prompts or first_prompts()
    log = []
    for turn in turns:
        outputs, cached, computed = [], [], []
        for p, m in zip(prompts, MAX_TOKENS):
            before = llm.stats().computed_prompt_tokens
            out = llm.generate([p], SamplingParams(temperature=0, max_tokens=m, ignore_eos=True), use_tqdm=False)[0]
            computed.append(llm.stats().computed_prompt_tokens - before)
            outputs.append(out.token_ids)
            cached.append(out.metrics.num_cached_tokens)
        log.append((prompts, outputs, cached, computed))
        prompts = next_prompts(prompts, outputs, turn)
    return log


def kept_blocks(prompt: list[int], output: list[int], drafting: bool) -> set[int]:
    """Blocks a finished turn leaves cached: every full block of its computed tokens (all but the
    last sampled one; with drafts accepted at the end, possibly that one too); the returning
    turn's hit drops the last of them when the MTP layer drafts."""
    computed = {len(prompt) + len(output) - 1} | ({len(prompt) + len(output)} if drafting else set())
    return {c // BLOCK - (1 if drafting else 0) for c in computed}


def check_returning_turns(log, drafting=False, first_turn_hits=None):
    """Every returning turn found exactly what its last turn left, and computed only the rest."""
    for t, (prompts, _, cached, computed) in enumerate(log):
        if t == 0:
            if first_turn_hits is not None:
                assert cached == first_turn_hits
            continue
        last_prompts, last_outputs = log[t - 1][0], log[t - 1][1]
        for p, lp, lo, c in zip(prompts, last_prompts, last_outputs, cached):
            assert c in {min(b, (len(p) - 1) // BLOCK) * BLOCK for b in kept_blocks(lp, lo, drafting)}, (t, c)
        assert computed == [len(p) - c for p, c in zip(prompts, cached)]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The conversations without tiers: the pool forgets, later turns compute more."""
    with engine(tiny_checkpoint) as llm:
        log = converse(llm)
        assert llm.stats().kv_tiers is None
    return log


def answers(log):
    return [turn[1] for turn in log]


def test_host_tier_serves_every_returning_turn_and_keeps_the_tokens(tiny_checkpoint, reference):
    with engine(tiny_checkpoint, kv_offload_memory=64 * block_bytes("auto")) as llm:
        log = converse(llm)
        tiers = llm.stats().kv_tiers
    assert answers(log) == answers(reference)
    check_returning_turns(log)
    assert sum(log[-1][2]) > sum(reference[-1][2])  # the pool alone forgot some of it
    assert tiers.host_hit_tokens > 0 and tiers.disk_hit_tokens == 0
    assert tiers.bytes_pool_to_host > 0
    assert tiers.bytes_host_to_pool == tiers.host_hit_tokens // BLOCK * block_bytes("auto")
    assert tiers.host_blocks == 64 and tiers.disk_blocks == 0


def test_disk_tier_survives_a_restart_and_ignores_other_weights(tiny_checkpoint, reference, tmp_path):
    disk = {"kv_disk_cache_dir": str(tmp_path)}
    with engine(tiny_checkpoint, kv_offload_memory=64 * block_bytes("auto"), **disk) as llm:
        first = converse(llm, turns=range(2))
        written = llm.stats().kv_tiers.bytes_host_to_disk
    assert answers(first) == answers(reference)[:2]
    check_returning_turns(first)
    files = list(tmp_path.rglob("*.kvb"))
    assert len(files) * block_bytes("auto") == written > 0
    # Header, token ids and entries: the entries are the 576 x layers x 4 bytes the design predicts.
    assert {f.stat().st_size for f in files} == {HEADER.size + 4 * BLOCK + block_bytes("auto")}

    # A fresh engine (host tier only for staging) finds the second turn's prefixes on disk.
    with engine(tiny_checkpoint, **disk) as llm:
        assert llm.stats().kv_tiers.disk_blocks_used == len(files)
        second_turn = first[1][0]
        again = converse(llm, turns=range(1, TURNS), prompts=second_turn)
        tiers = llm.stats().kv_tiers
    assert answers(again) == answers(reference)[1:]
    # The first engine computed these prompts whole: each finds all of itself but its last token.
    assert again[0][2] == [(len(p) - 1) // BLOCK * BLOCK for p in second_turn]
    check_returning_turns(again)
    assert tiers.disk_hit_tokens >= sum(first[1][2]) and tiers.reads_failed == 0

    other = make_checkpoint("tiny", seed=1, out_dir=tmp_path / "other")
    with engine(other, **disk) as llm:
        assert llm.stats().kv_tiers.disk_blocks_used == 0
        log = converse(llm, turns=range(1, 2), prompts=second_turn)
        assert log[0][2] == [0, 0, 0, 0]


def test_a_corrupt_or_truncated_block_file_is_a_miss(tiny_checkpoint, reference, tmp_path):
    disk = {"kv_disk_cache_dir": str(tmp_path)}
    with engine(tiny_checkpoint, **disk) as llm:
        converse(llm, turns=range(1))
    files = sorted(tmp_path.rglob("*.kvb"))
    assert len(files) >= 4
    data = bytearray(files[0].read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the entries
    files[0].write_bytes(bytes(data))
    with open(files[1], "r+b") as f:  # cut short
        f.truncate(files[1].stat().st_size // 2)
    files[2].write_bytes(b"")
    with engine(tiny_checkpoint, **disk) as llm:
        log = converse(llm, turns=range(1))  # the same first prompts: every block read back
        tiers = llm.stats().kv_tiers
    assert answers(log) == answers(reference)[:1]
    assert tiers.reads_failed == 3 and tiers.disk_hit_tokens > 0
    # Each bad file was removed, its block computed again, and written back whole.
    size = HEADER.size + 4 * BLOCK + block_bytes("auto")
    assert [f.stat().st_size for f in files[:3]] == [size] * 3 and files[0].read_bytes() != bytes(data)


@pytest.mark.parametrize("kv_cache_dtype,spec", [("fp8", 0), ("auto", 2)])
def test_tiers_keep_the_tokens_with_an_fp8_cache_and_with_mtp(tiny_checkpoint, kv_cache_dtype, spec, tmp_path):
    with engine(tiny_checkpoint, kv_cache_dtype, num_speculative_tokens=spec) as llm:
        plain = converse(llm)
    options = {"num_speculative_tokens": spec, "kv_offload_memory": 64 * block_bytes(kv_cache_dtype)}
    with engine(tiny_checkpoint, kv_cache_dtype, **options) as llm:
        tiered = converse(llm)
        assert llm.stats().kv_tiers.host_hit_tokens > 0
    assert answers(tiered) == answers(plain)
    check_returning_turns(tiered, drafting=bool(spec))


def test_the_tiers_numbers_reach_prometheus(tiny_checkpoint):
    from prometheus_client import CollectorRegistry, generate_latest

    from entrypoints.async_llm import Health
    from entrypoints.metrics import EngineCollector

    with engine(tiny_checkpoint, kv_offload_memory=64 * block_bytes("auto")) as llm:
        converse(llm, turns=range(2))
        stats = llm.stats()

    class Snapshot:
        def stats_snapshot(self):
            return stats, {}, Health("ok")
    registry = CollectorRegistry()
    registry.register(EngineCollector(Snapshot()))
    text = generate_latest(registry).decode()
    t = stats.kv_tiers
    assert f'mlaserve:kv_tier_hits_total{{tier="host"}} {float(t.host_hit_tokens)}' in text
    assert f'mlaserve:kv_tier_bytes_total{{direction="pool_to_host"}} {float(t.bytes_pool_to_host)}' in text
    assert 'mlaserve:kv_tier_blocks{tier="host"} 64.0' in text
    assert "mlaserve:kv_tier_load_seconds_bucket" in text


def test_with_expert_parallelism_a_returning_turn_goes_to_the_rank_that_holds_it(tiny_checkpoint, reference, tmp_path):
    """Each rank has its own pool and tiers; a whole turn is sent at once, so the conversations
    spread over both ranks, and each later turn must find its history on the rank it went to."""
    with engine(tiny_checkpoint, pool_blocks=24, ep_size=2, kv_offload_memory=64 * block_bytes("auto"),
                kv_disk_cache_dir=str(tmp_path)) as llm:
        prompts, log = first_prompts(), []
        for turn in range(TURNS):
            params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
            outs = llm.generate(prompts, params, use_tqdm=False)
            log.append((prompts, [o.token_ids for o in outs], [o.metrics.num_cached_tokens for o in outs]))
            prompts = next_prompts(prompts, [o.token_ids for o in outs], turn)
        stats = llm.stats()
    assert stats.rank_requests == [6, 6]
    assert [turn[1] for turn in log] == answers(reference)
    for t in range(1, TURNS):
        for p, lp, lo, c in zip(log[t][0], log[t - 1][0], log[t - 1][1], log[t][2]):
            assert c == min(kept_blocks(lp, lo, False).pop(), (len(p) - 1) // BLOCK) * BLOCK
    assert {p.name for p in tmp_path.glob("*/*")} == {"rank0", "rank1"}


def test_with_a_bf16_cache_the_tiers_are_a_larger_pool(tiny_checkpoint):
    """bf16 entries recomputed in another batch may round differently, so the peer here is a pool
    large enough to keep every conversation: the tiers must give its tokens and its hits."""
    with engine(tiny_checkpoint, pool_blocks=64, dtype="bfloat16") as llm:
        large = converse(llm)
    with engine(tiny_checkpoint, dtype="bfloat16", kv_offload_memory=64 * block_bytes("auto", "bfloat16")) as llm:
        tiered = converse(llm)
        assert llm.stats().kv_tiers.host_hit_tokens > 0
    assert answers(tiered) == answers(large)
    assert [turn[2] for turn in tiered] == [turn[2] for turn in large]


def test_a_host_tier_larger_than_the_hosts_memory_is_refused_at_start(tiny_checkpoint):
    with pytest.raises(Exception, match="host tier needs .* more than the .* bytes of memory this host has"):
        engine(tiny_checkpoint, kv_offload_memory=1 << 50)
