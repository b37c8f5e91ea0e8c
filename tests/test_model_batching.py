"""Chunked prefill equals one-shot prefill; a sequence's logits do not depend on its batch-mates."""

import pytest
import torch

from engine.model_config import ModelConfig
from model.deepseek_v3 import DeepseekV3
from model.loader import load_weights
from tests.model_runner_util import PagedRunner


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    cfg = ModelConfig.from_checkpoint(tiny_checkpoint)
    return DeepseekV3(cfg, load_weights(tiny_checkpoint, cfg, torch.float32))


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(2, 258, (150,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_one_shot(model, prompt, chunk):
    one_shot = PagedRunner(model, block_size=16).step({0: prompt})[0]
    runner = PagedRunner(model, block_size=16, seed=1)
    pieces = [runner.step({0: prompt[i : i + chunk]})[0] for i in range(0, len(prompt), chunk)]
    assert _rel_err(torch.cat(pieces), one_shot) < 1e-5


def test_logits_do_not_depend_on_batch_mates(model, prompt):
    alone = PagedRunner(model, block_size=16)
    a_prefill = alone.step({0: prompt[:100]})[0]
    a_decode = alone.step({0: prompt[100:101]})[0]

    crowd = PagedRunner(model, block_size=16, seed=3)
    others = torch.randint(2, 258, (3, 60), generator=torch.Generator().manual_seed(9)).tolist()
    crowd.step({1: others[0][:30], 2: others[1][:5]})
    # prefill next to a decode and another sequence's chunk; then decode next to a long prefill
    b_prefill = crowd.step({1: others[0][30:31], 0: prompt[:100], 2: others[1][5:60]})[0]
    b_decode = crowd.step({3: others[2], 0: prompt[100:101], 1: [5]})[0]
    assert _rel_err(b_prefill, a_prefill) < 1e-5
    assert _rel_err(b_decode, a_decode) < 1e-5
