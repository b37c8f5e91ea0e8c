"""Offline throughput: mlaserve vs transformers `generate` on the same checkpoint, same threads.

N requests with seeded random input and output lengths; every request generates exactly its
output length (ignore_eos). transformers runs padded batches (left padding) of --hf-batch-size and
is credited only with the tokens each request asked for.

    .venv/bin/python benchmarks/throughput.py --num-requests 256
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

# This folder holds kernels.py, which would shadow the kernels package: the repo root goes first.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch


def workload(n: int, seed: int, vocab: int, in_range, out_range):
    rng = random.Random(seed)
    return [([rng.randrange(2, vocab) for _ in range(rng.randint(*in_range))], rng.randint(*out_range))
            for _ in range(n)]


def run_mlaserve(ckpt: Path, reqs, args) -> float:
    from engine import LLM, SamplingParams

    began = time.perf_counter()
    with LLM(ckpt, dtype="bfloat16", max_num_batched_tokens=args.max_num_batched_tokens,
             max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory,
             kv_cache_dtype=args.kv_cache_dtype, cuda_graphs=args.cuda_graphs) as llm:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        print(f"mlaserve start-up (processes, weights, kernel builds) and a 4-token warm-up: "
              f"{time.perf_counter() - began:.1f} s", flush=True)
        params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
        start = time.perf_counter()
        outs = llm.generate([p for p, _ in reqs], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == n for o, (_, n) in zip(outs, reqs))
    return elapsed


def run_transformers(ckpt: Path, reqs, batch_size: int) -> float:
    from model.hf_reference import load_hf_model

    model = load_hf_model(ckpt, torch.bfloat16)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(reqs), batch_size):
            batch = reqs[i : i + batch_size]
            width = max(len(p) for p, _ in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for j, (p, _) in enumerate(batch):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            n = max(o for _, o in batch)
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, nargs=2, default=[32, 256])
    ap.add_argument("--output-len", type=int, nargs=2, default=[32, 128])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default="checkpoints/small-seed0")
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--kv-cache-memory", type=int, default=2 << 30)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--cuda-graphs", action="store_true", help="decode steps replayed from CUDA graphs (GPU)")
    args = ap.parse_args()
    from model.checkpoint_maker import ensure_checkpoint

    ckpt = ensure_checkpoint(args.checkpoint)
    reqs = workload(args.num_requests, args.seed, 258, args.input_len, args.output_len)
    out_tokens = sum(o for _, o in reqs)
    t_ours = run_mlaserve(ckpt, reqs, args)
    print(f"mlaserve:     {len(reqs) / t_ours:7.2f} req/s  {out_tokens / t_ours:9.1f} output tok/s  ({t_ours:.1f} s)")
    if not args.skip_transformers:
        t_hf = run_transformers(ckpt, reqs, args.hf_batch_size)
        print(f"transformers: {len(reqs) / t_hf:7.2f} req/s  {out_tokens / t_hf:9.1f} output tok/s  ({t_hf:.1f} s)")
        print(f"ratio (mlaserve / transformers output tok/s): {t_hf / t_ours:.2f}x")
    print(f"threads: {torch.get_num_threads()}, requests: {len(reqs)}, output tokens: {out_tokens}")


if __name__ == "__main__":
    main()
