"""Trains the embedded demo model: the `demo` preset of the DeepSeek-V3 architecture, MTP module
included, on model/demo_task.py's problems, on the CPU, and writes it in the published FP8 layout.

The training twin is transformers' DeepseekV3ForCausalLM (the same implementation the parity
tests hold the engine to) plus ReferenceMTP; the loss is the next-token loss plus the MTP
module's next-next-token loss (DeepSeek-V3 report, section 2.2), both on answer tokens only.
Deterministic by seed for a given machine and thread count.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.model_config import ModelConfig
from model.checkpoint_maker import encode_for_checkpoint, preset_config, write_sharded
from model.demo_task import Problem, problems
from model.hf_reference import ReferenceMTP
from model.tokenizer_maker import build_tokenizer, write_tokenizer

EOS = 1
IGNORE = -100
DEFAULT_STEPS = 700
# Per 16 problems: 8 plain sorts, 5 tool calls, 3 answers from the tool's output (the tool
# conversations are six times longer). The calls copy the question's digits into the arguments,
# which a model this size learns last: 3 in 16 gave 28% of held-out calls right.
MIXTURE = ("plain",) * 8 + ("call",) * 5 + ("answer",) * 3


def make_batch(problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] (prompt, completion, EOS, EOS padding) and labels [B, T]: the completion and its
    EOS, IGNORE elsewhere."""
    tok = build_tokenizer()
    prompts = tok.encode_batch([p.prompt for p in problems], add_special_tokens=False)
    completions = tok.encode_batch([p.completion for p in problems], add_special_tokens=False)
    seqs = [(q.ids, a.ids + [EOS]) for q, a in zip(prompts, completions)]
    length = max(len(q) + len(a) for q, a in seqs)
    ids = torch.full((len(seqs), length), EOS, dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE, dtype=torch.long)
    for i, (q, a) in enumerate(seqs):
        ids[i, : len(q) + len(a)] = torch.tensor(q + a)
        labels[i, len(q) : len(q) + len(a)] = torch.tensor(a)
    return ids, labels


def build_twin(raw_config: dict, seed: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = {k: v for k, v in raw_config.items() if k != "quantization_config"}
    hf_cfg = DeepseekV3Config(**cfg)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    main = DeepseekV3ForCausalLM(hf_cfg)
    mtp = ReferenceMTP(hf_cfg)
    mtp.apply(main._init_weights)
    return main, mtp


def losses(main, mtp: ReferenceMTP, batch: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token and MTP losses over the batch's completion tokens; each kind of problem is
    its own forward, so the short ones are not padded to the long ones' length."""
    sums, counts = [0.0, 0.0], [0, 0]
    for kind in dict.fromkeys(p.kind for p in batch):
        ids, labels = make_batch([p for p in batch if p.kind == kind])
        logits, mtp_logits = mtp(main, ids)
        vocab = logits.shape[-1]
        # the main head at position t predicts token t + 1, the MTP module's token t + 2
        for i, (lg, lb) in enumerate(((logits[:, :-1], labels[:, 1:]), (mtp_logits[:, :-1], labels[:, 2:]))):
            sums[i] = sums[i] + F.cross_entropy(lg.reshape(-1, vocab), lb.reshape(-1), ignore_index=IGNORE,
                                                reduction="sum")
            counts[i] += int((lb != IGNORE).sum())
    return sums[0] / counts[0], sums[1] / counts[1]


def published_weights(cfg: ModelConfig, main, mtp: ReferenceMTP) -> dict[str, torch.Tensor]:
    """The twin's tensors under the checkpoint's names (per-expert weights, MTP copies of the
    embedding and head)."""
    out: dict[str, torch.Tensor] = {}
    inter = cfg.moe_intermediate_size
    for name, t in main.state_dict().items():
        if ".mlp.experts." not in name:
            out[name] = t
            continue
        layer = name.split(".mlp.experts.")[0]
        for e in range(cfg.n_routed_experts):
            if name.endswith("gate_up_proj"):
                out[f"{layer}.mlp.experts.{e}.gate_proj.weight"] = t[e, :inter]
                out[f"{layer}.mlp.experts.{e}.up_proj.weight"] = t[e, inter:]
            else:
                out[f"{layer}.mlp.experts.{e}.down_proj.weight"] = t[e]
    out.update(mtp.published_state(cfg))
    L = cfg.num_hidden_layers
    out[f"model.layers.{L}.embed_tokens.weight"] = out["model.embed_tokens.weight"]
    out[f"model.layers.{L}.shared_head.head.weight"] = out["lm_head.weight"]
    return {k: v.detach().float() for k, v in out.items()}


def train(seed: int = 0, steps: int = DEFAULT_STEPS, batch_size: int = 64, lr: float = 3e-3, mtp_weight: float = 0.5,
          progress: Callable[[int, float, float], None] | None = None) -> tuple[dict, object, ReferenceMTP, dict]:
    raw = preset_config("demo")
    main, mtp = build_twin(raw, seed)
    params = list(main.parameters()) + [p for n, p in mtp.named_parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    data = problems(seed, steps * batch_size, MIXTURE)
    log = []
    main.train()
    mtp.train()
    start = time.time()
    for step in range(steps):
        main_loss, mtp_loss = losses(main, mtp, data[step * batch_size : (step + 1) * batch_size])
        opt.zero_grad(set_to_none=True)
        (main_loss + mtp_weight * mtp_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if progress:
            progress(step, main_loss.item(), mtp_loss.item())
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(main_loss.item(), 4), "mtp_loss": round(mtp_loss.item(), 4),
                        "elapsed_s": round(time.time() - start, 1)})
    main.eval()
    mtp.eval()
    meta = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "mtp_weight": mtp_weight,
            "mixture": list(MIXTURE),
            "train_seconds": round(time.time() - start, 1), "log": log}
    return raw, main, mtp, meta


@torch.no_grad()
def teacher_forced_scores(main, mtp: ReferenceMTP, held: list[Problem]) -> dict[str, float]:
    """Exact-answer rate with every answer token (and the EOS) the argmax, which is what greedy
    decoding produces; and how often the MTP argmax is the token two ahead, on answer tokens."""
    ids, labels = make_batch(held)
    logits, mtp_logits = mtp(main, ids)
    target = labels[:, 1:]
    ok = (logits[:, :-1].argmax(-1) == target) | (target == IGNORE)
    mtp_target = labels[:, 2:]
    mtp_hit = (mtp_logits[:, :-1].argmax(-1) == mtp_target)[mtp_target != IGNORE]
    return {"exact": float(ok.all(-1).float().mean()), "mtp_top1": float(mtp_hit.float().mean())}


def write_checkpoint(raw: dict, main, mtp: ReferenceMTP, out_dir: str | Path, meta: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(raw)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    write_sharded(encode_for_checkpoint(cfg, published_weights(cfg, main, mtp)), out, 1)
    write_tokenizer(out)
    (out / "demo_training.json").write_text(json.dumps(meta, indent=2))
    return out
