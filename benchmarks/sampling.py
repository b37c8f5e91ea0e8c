"""The sampler's cost per decode step at DeepSeek-V3's vocabulary (129280), next to two peers
measured in the same run: transformers' logits processors with torch.multinomial (what
`generate(do_sample=True)` runs) on the same logits, and one copy of the logits (the least a
pass over them costs on this device).

Cases: sampling with temperature, top-k and top-p; greedy; the three penalties over a 2048-token history
(mlaserve's steady state: the history carried across steps, one new token each; transformers
has only the repetition penalty, so its peer does less); logit_bias
with bad words and allowed_token_ids (no transformers peer). On a GPU the logits stay there.

The logits are `randn` ("flat": the 0.95 nucleus holds most of the vocabulary, so mlaserve's
top-p must sort whole rows) or `4 * randn` ("peaked": at temperature 0.8 the 1024 largest
logits hold over 95% of the mass, as a language model's next-token distribution mostly does,
and top-p is settled there without a sort). Transformers sorts either way.

    .venv/bin/python benchmarks/sampling.py --batch 8 64 256
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from benchmarks.cpu_decode_attention import median_times
from engine.sampling_params import SamplingParams
from model.logit_edits import TokenHistory
from model.sampler import SampleRow, sample

VOCAB = 129280  # DeepSeek-V3


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--history", type=int, default=2048, help="tokens per request (half prompt, half output)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    rnd = random.Random(0)
    cases = {
        "temperature 0.8": SamplingParams(temperature=0.8),
        "temperature 0.8, top_p 0.95": SamplingParams(temperature=0.8, top_p=0.95),
        "temperature 0.8, top_p 0.95, peaked": SamplingParams(temperature=0.8, top_p=0.95),
        "temperature 0.8, top_k 50": SamplingParams(temperature=0.8, top_k=50),
        "greedy": SamplingParams(temperature=0),
        "penalties (rep 1.1, freq 0.3, pres 0.3)": SamplingParams(temperature=0.8, repetition_penalty=1.1,
                                                                  frequency_penalty=0.3, presence_penalty=0.3),
        "logit_bias (50) + bad words (20 x 3)": SamplingParams(temperature=0.8, logit_bias={
            rnd.randrange(VOCAB): 2.0 for _ in range(50)}, bad_words_token_ids=[[rnd.randrange(VOCAB) for _ in range(3)]
                                                                                 for _ in range(20)]),
        "allowed_token_ids (1000)": SamplingParams(temperature=0.8, allowed_token_ids=rnd.sample(range(VOCAB), 1000)),
    }
    peers = {  # (transformers has no frequency or presence penalty: its peer does less)
        "temperature 0.8": LogitsProcessorList([TemperatureLogitsWarper(0.8)]),
        "temperature 0.8, top_p 0.95": LogitsProcessorList([TemperatureLogitsWarper(0.8), TopPLogitsWarper(0.95)]),
        "temperature 0.8, top_p 0.95, peaked": LogitsProcessorList([TemperatureLogitsWarper(0.8),
                                                                    TopPLogitsWarper(0.95)]),
        "temperature 0.8, top_k 50": LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(50)]),
        "greedy": None,
        "penalties (rep 1.1, freq 0.3, pres 0.3)": LogitsProcessorList([
            RepetitionPenaltyLogitsProcessor(1.1), TemperatureLogitsWarper(0.8)]),
    }
    print(f"device {dev}, vocab {VOCAB}, history {args.history} tokens; median of {args.reps}, taking turns")
    print(f"{'case':42s} {'batch':>5s} {'mlaserve ms':>12s} {'transformers ms':>16s} {'speed-up':>9s} "
          f"{'logits copies':>14s}")
    for batch in args.batch:
        flat = torch.randn(batch, VOCAB, device=dev)
        hist = [[rnd.randrange(VOCAB) for _ in range(args.history)] for _ in range(batch)]
        for name, params in cases.items():
            rows = [SampleRow(f"r{i}", params, list(h), args.history // 2) for i, h in enumerate(hist)]
            logits = flat * 4 if name.endswith("peaked") else flat
            t = median_times(contenders(logits, rows, hist, peers.get(name, False), dev), args.reps)
            peer = (f"{t['theirs'] * 1e3:16.2f} {t['theirs'] / t['ours']:8.2f}x" if "theirs" in t
                    else f"{'-':>16s} {'-':>9s}")
            print(f"{name:42s} {batch:5d} {t['ours'] * 1e3:12.2f} {peer} {t['ours'] / t['copy']:14.1f}")


def contenders(logits: torch.Tensor, rows: list[SampleRow], hist: list[list[int]], procs, dev: str) -> dict:
    """procs: transformers' processors (None: greedy, False: no peer)."""
    history = TokenHistory(VOCAB, dev)
    sample(logits, rows, None, history=history)  # the history folded in once, as a worker has it
    ids = torch.tensor(hist, device=dev)

    def ours():
        for r in rows:  # one new token per step, as in decoding
            r.token_ids.append(7)
        sample(logits, rows, None, history=history)
        sync(dev)

    def copy():
        logits.clone()
        sync(dev)

    def theirs():
        if procs is None:
            logits.argmax(-1)
        else:
            torch.multinomial(procs(ids, logits.clone()).softmax(-1), 1)
        sync(dev)

    fns = {"ours": ours, "copy": copy}
    if procs is not False:
        fns["theirs"] = theirs
    return fns


if __name__ == "__main__":
    main()
