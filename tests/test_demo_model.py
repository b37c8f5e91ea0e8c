"""The embedded demo model: trained, accurate on held-out problems through the engine (as under
the transformers reference), its MTP module's drafts accepted; the trainer deterministic."""

import torch

from engine import LLM, SamplingParams
from engine.model_config import ModelConfig
from entrypoints.demo import demo_prompts, reference_correct
from model.demo_checkpoint import ASSET_DIR, default_model_dir
from model.demo_task import is_correct, problems
from model.demo_trainer import published_weights, teacher_forced_scores, train, write_checkpoint
from model.loader import load_weights

N_HELD_OUT = 400
N_TOOL_CHATS = 64


def test_engine_accuracy_on_held_out_problems_equals_transformers_and_mtp_drafts_are_accepted():
    model_dir = default_model_dir()
    assert model_dir == ASSET_DIR, "the trained demo checkpoint is committed under assets/demo"
    held = demo_prompts(model_dir, N_HELD_OUT) + demo_prompts(model_dir, N_TOOL_CHATS, ("call", "answer"))
    with LLM(model_dir, dtype="float32", num_speculative_tokens=1, speculative_draft_policy="fixed") as llm:
        outs = llm.generate([p.prompt for p in held], SamplingParams(temperature=0, max_tokens=96), use_tqdm=False)
        stats = llm.stats()
        # LLM.chat renders with the checkpoint's template, as the training did; a bad conversation fails alone
        chats = llm.chat([held[0].messages, [{"role": "wizard", "content": "x"}]],
                         SamplingParams(temperature=0, max_tokens=96), use_tqdm=False)
    engine_right = [is_correct(p, o.text) for p, o in zip(held, outs)]
    assert chats[1].finish_reason == "error" and "messages[0].role" in chats[1].error
    assert chats[0].text == outs[0].text and chats[0].prompt_token_ids == outs[0].prompt_token_ids
    assert all(o.finish_reason == "stop" for o, right in zip(outs, engine_right) if right)  # answer, then EOS
    # What training reaches (docs/chat.md): sorting and answering from the tool's output nearly
    # always, copying the question's digits into a call about a third of the time.
    for kind, floor in (("plain", 0.95), ("answer", 0.85), ("call", 0.2)):
        right = [r for p, r in zip(held, engine_right) if p.kind == kind]
        assert sum(right) / len(right) >= floor, (kind, sum(right), len(right))
    assert len({p.digits.count(",") for p in held}) >= 3  # lists of several lengths

    # transformers' greedy right/wrong per prompt (teacher-forced argmax: see reference_correct)
    assert reference_correct(model_dir, held) == engine_right

    first_draft = stats.spec_accepted_per_pos[0] / stats.spec_num_drafts
    assert first_draft >= 0.8, first_draft


def test_trainer_is_deterministic_by_seed_and_writes_a_loadable_checkpoint(tmp_path):
    a = train(seed=3, steps=2, batch_size=4)
    b = train(seed=3, steps=2, batch_size=4)
    c = train(seed=4, steps=2, batch_size=4)
    cfg = ModelConfig.from_dict(a[0])
    wa, wb, wc = (published_weights(cfg, r[1], r[2]) for r in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    out = write_checkpoint(a[0], a[1], a[2], tmp_path / "demo", a[3])
    w = load_weights(out, ModelConfig.from_checkpoint(out), torch.float32, include_mtp=True)
    assert f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in w
    scores = teacher_forced_scores(a[1], a[2], problems(9, 8))
    assert 0.0 <= scores["exact"] <= 1.0
