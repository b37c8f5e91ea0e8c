"""Structured outputs' cost: output tokens/s of a batch where every request is constrained by a JSON
schema, and of the same batch with a tenth constrained, each as a ratio against the same batch
unconstrained, measured in the same run on one engine (the three alternate, --rounds times; the
best of each is compared). Every request writes exactly --output-len tokens (ignore_eos; the
schema, an array of at least 64 objects, never completes sooner), so the batches do the same work
but for the grammar's. Goals (issue 31): >= 0.8x with every request constrained, >= 0.95x with a tenth.

Then the time to first token (a one-token request, wall clock through LLM.generate) of a request
whose schema is new, against one whose schema was compiled before (the frontend's cache and the
worker's): the difference is the compile. Last, xgrammar's work for the same schema at
DeepSeek-V3's vocabulary size (129280 tokens; a synthetic byte-level vocabulary, the real
tokenizer not being on the machine): compile time, the blob a request carries, the mask's fill
time per token.

    .venv/bin/python benchmarks/structured.py                 # the small preset's random weights
    .venv/bin/python benchmarks/structured.py --preset tiny --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This folder holds kernels.py, which would shadow the kernels package: the repo root goes first.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

ITEM = {"type": "object", "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"},
                                         "tag": {"enum": ["alpha", "beta", "gamma"]}},
        "required": ["id", "ok", "tag"]}


def schema(variant: int = 0) -> dict:
    item = dict(ITEM, properties={**ITEM["properties"], f"f{variant}": {"type": "number"}})
    return {"type": "array", "items": item, "minItems": 64}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttft-samples", type=int, default=5)
    args = ap.parse_args()

    from engine import LLM, SamplingParams
    from engine.sampling_params import StructuredOutputsParams
    from model.checkpoint_maker import make_checkpoint

    tmp = tempfile.TemporaryDirectory()
    ckpt = make_checkpoint(args.preset, seed=0, out_dir=Path(tmp.name) / args.preset)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 258, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    constrained = StructuredOutputsParams(json=schema(), disable_any_whitespace=True)

    def params(i: int, share: float) -> SamplingParams:
        on = i < round(share * args.batch)
        return SamplingParams(temperature=1.0, seed=i, max_tokens=args.output_len, ignore_eos=True,
                              structured_outputs=constrained if on else None)

    shares = {"unconstrained": 0.0, "all constrained": 1.0, "a tenth constrained": 0.1}
    best: dict[str, float] = {}
    with LLM(ckpt, dtype="bfloat16") as llm:
        llm.generate(prompts[:2], params(0, 1.0), use_tqdm=False)  # warm-up, and the schema compiled
        for r in range(args.rounds):
            for name, share in shares.items():
                batch = [params(i, share) for i in range(args.batch)]
                start = time.perf_counter()
                outs = llm.generate(prompts, batch, use_tqdm=False)
                tps = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
                best[name] = max(best.get(name, 0.0), tps)
                print(f"round {r}: {name:20s} {tps:8.1f} output tok/s", flush=True)
        base = best["unconstrained"]
        print(f"\n{args.preset} preset, {args.batch} requests x {args.output_len} tokens, best of {args.rounds}:")
        for name in shares:
            print(f"  {name:20s} {best[name]:8.1f} tok/s  {best[name] / base:.3f}x unconstrained")
        print("  goals: all constrained >= 0.8x, a tenth >= 0.95x")

        def ttft(spec: StructuredOutputsParams) -> float:
            start = time.perf_counter()
            llm.generate([prompts[0]], SamplingParams(max_tokens=1, structured_outputs=spec), use_tqdm=False)
            return time.perf_counter() - start

        new, cached = [], []
        for k in range(args.ttft_samples):  # alternating: a schema never seen, then one seen just before
            spec = StructuredOutputsParams(json=schema(1000 + k), disable_any_whitespace=True)
            new.append(ttft(spec))
            cached.append(ttft(spec))
        n_med, c_med = statistics.median(new), statistics.median(cached)
        print(f"\ntime to first token, median of {args.ttft_samples}: new schema {n_med * 1e3:.1f} ms, cached "
              f"{c_med * 1e3:.1f} ms ({n_med / c_med:.2f}x; the compile costs {1e3 * (n_med - c_med):.1f} ms)")
    deepseek_vocabulary()
    return 0


def deepseek_vocabulary(size: int = 129280) -> None:
    import json
    import random

    import xgrammar as xgr

    rng = random.Random(0)
    printable = [chr(c) for c in range(33, 127)]
    vocab, seen = printable + ["Ġ", "Ċ"], set(printable)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789{}[]\":,. _-"
    while len(vocab) < size - 1:  # words of 2-10 characters, most after a space (byte-level BPE's Ġ)
        word = ("Ġ" if rng.random() < 0.6 else "") + "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 10)))
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    vocab.append("<eos>")
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=size, stop_token_ids=[size - 1])
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema()), any_whitespace=False)
    compile_s = time.perf_counter() - start
    blob = compiled.serialize_json()
    matcher, mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, size)
    index = {tok: i for i, tok in enumerate(vocab[:200])}
    text = json.dumps([{"id": i, "ok": True, "tag": "beta", "f0": 0.5} for i in range(64)], separators=(", ", ": "))
    fills = []
    for ch in text[:2000]:  # the output one character a token
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        fills.append(time.perf_counter() - start)
        if not matcher.accept_token(index["Ġ" if ch == " " else ch]):
            raise AssertionError(f"the schema refused {ch!r}")
    print(f"\nat {size} tokens (synthetic vocabulary): compile {compile_s * 1e3:.1f} ms, "
          f"blob {len(blob) / 1e3:.0f} kB, mask fill per token median {statistics.median(fills) * 1e6:.1f} us, "
          f"p99 {sorted(fills)[int(0.99 * len(fills))] * 1e6:.1f} us over {len(fills)} tokens")


if __name__ == "__main__":
    sys.exit(main())
