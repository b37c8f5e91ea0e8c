"""The model equals transformers' DeepseekV3ForCausalLM on the same (dequantized) weights, fp32."""

import pytest
import torch

from engine.model_config import ModelConfig
from model.deepseek_v3 import DeepseekV3
from model.hf_reference import load_hf_model
from model.loader import load_weights
from tests.model_runner_util import PagedRunner

PROMPT_LENGTHS = [1, 5, 17, 40, 100]


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    cfg = ModelConfig.from_checkpoint(tiny_checkpoint)
    ours = DeepseekV3(cfg, load_weights(tiny_checkpoint, cfg, torch.float32))
    return ours, load_hf_model(tiny_checkpoint, torch.float32)


def test_last_token_logits_match_transformers(models):
    ours, hf = models
    prompts = _prompts(ours.cfg.vocab_size)
    runner = PagedRunner(ours, block_size=16)
    logits = runner.step({i: p for i, p in enumerate(prompts)})
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            ref = hf(torch.tensor([p])).logits[0, -1]
            assert _rel_err(logits[i][-1], ref) < 1e-4, f"prompt of length {len(p)}"


def test_greedy_tokens_match_transformers_through_paged_cache(models):
    ours, hf = models
    prompts = _prompts(ours.cfg.vocab_size)
    # block size 8: the longest sequence spans 17 blocks, all shuffled
    got = PagedRunner(ours, block_size=8).greedy(prompts, max_new_tokens=32)
    with torch.inference_mode():
        for p, tokens in zip(prompts, got):
            ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                              eos_token_id=None, pad_token_id=0)
            assert tokens == ref[0, len(p):].tolist(), f"prompt of length {len(p)}"
