"""What expert-parallel dispatch + combine costs: model/expert_parallel.py's all_to_all route
(counts, token rows, expert ids, outputs back) in N gloo processes on this machine, with the
experts replaced by the identity so only the exchange is timed.

The peer is the machine's limit measured in the same run: copying the same bytes once in
memory (torch clone), so the ratio says how far the exchange is from a plain memory copy.
Also prints the bytes DeepSeek-V3 (hidden 7168, top-8 of 256 experts) moves per token per MoE
layer, in bf16 and with FP8 dispatch.

    .venv/bin/python benchmarks/expert_parallel.py [--ep 2 4] [--tokens 64 512] [--hidden 7168]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not benchmarks/

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.expert_parallel import ExpertParallel

NUM_EXPERTS, TOP_K = 256, 8


def deepseek_v3_bytes(hidden: int = 7168, top_k: int = TOP_K) -> dict[str, int]:
    """Per token per MoE layer and per destination rank of the token (this engine sends a token
    once to each rank holding one of its experts, with its k expert ids and weights)."""
    choices = top_k * (8 + 4)  # int64 id + float32 weight each
    return {"dispatch_bf16": hidden * 2 + choices, "combine_bf16": hidden * 2,
            "dispatch_fp8": hidden + hidden // 128 * 4 + choices}  # e4m3 + a float32 scale per 128


def _identity_experts(local: range):
    def run(rows, weights, ids):
        mine = (ids >= local.start) & (ids < local.stop)
        return rows * (weights * mine).sum(-1, keepdim=True).to(rows.dtype)
    return run


def _worker(rank: int, size: int, port: int, tokens: int, hidden: int, dtype: str, reps: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    dt = getattr(torch, dtype)
    ep = ExpertParallel(rank, size, NUM_EXPERTS)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, hidden, generator=g).to(dt)
    ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=g)[:TOP_K] for _ in range(tokens)])
    w = torch.rand(tokens, TOP_K, generator=g)
    times = []
    for i in range(reps + 2):
        dist.barrier()
        t = time.perf_counter()
        y = ep.dispatch_combine(x, w, ids, _identity_experts(ep.local))
        if i >= 2:
            times.append(time.perf_counter() - t)
    expected = x * w.sum(-1, keepdim=True).to(dt)
    assert torch.allclose(y.float(), expected.float(), rtol=2e-2, atol=2e-2), "the route lost or mixed rows"
    dest = torch.div(ids, NUM_EXPERTS // size, rounding_mode="floor")
    pairs = torch.zeros(tokens, size, dtype=torch.bool).scatter_(1, dest, True)
    remote = int(pairs.sum()) - int(pairs[:, rank].sum())  # rows that leave this rank
    t = time.perf_counter()
    for _ in range(reps):
        x.repeat(TOP_K, 1).clone()
    copy = (time.perf_counter() - t) / reps
    if rank == 0:
        out.put((statistics.median(times), remote * (hidden * x.element_size() * 2 + TOP_K * 12), copy))
    dist.destroy_process_group()


def measure(size: int, tokens: int, hidden: int, dtype: str, reps: int) -> tuple[float, int, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, size, port, tokens, hidden, dtype, reps, out)) for r in range(size)]
    for p in procs:
        p.start()
    try:
        while True:
            try:
                return out.get(timeout=1)
            except Exception:  # queue.Empty: give up as soon as a rank has died
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}") from None
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    b = deepseek_v3_bytes()
    bf16, fp8 = b["dispatch_bf16"] + b["combine_bf16"], b["dispatch_fp8"] + b["combine_bf16"]
    print("DeepSeek-V3 (hidden 7168, top-8), per token per MoE layer, per destination rank d of the token "
          f"(d <= min(8, N); <= 4 when ranks align with its 8 expert groups, topk_group 4): dispatch "
          f"{b['dispatch_bf16'] / 1e3:.1f} KB bf16 / {b['dispatch_fp8'] / 1e3:.1f} KB FP8 (+scales), combine "
          f"{b['combine_bf16'] / 1e3:.1f} KB bf16: d x {bf16 / 1e3:.1f} KB in bf16, d x {fp8 / 1e3:.1f} KB with FP8 "
          f"dispatch (d = 4: {4 * bf16 / 1e3:.0f} / {4 * fp8 / 1e3:.0f} KB; d = 8: {8 * bf16 / 1e3:.0f} / "
          f"{8 * fp8 / 1e3:.0f} KB); the rows for the token's own rank stay local")
    print(f"\ngloo on this CPU, hidden {args.hidden}, {args.dtype}, top-{TOP_K} of {NUM_EXPERTS} experts, identity "
          "experts; peer: one in-memory copy of 8 rows per token")
    print(f"{'ep':>3} {'tokens/rank':>11} {'ms per layer':>12} {'remote MB':>9} {'GB/s':>6} {'copy ms':>8} "
          f"{'x copy':>7} {'us/token':>8}")
    for size in args.ep:
        for tokens in args.tokens:
            sec, remote_bytes, copy = measure(size, tokens, args.hidden, args.dtype, args.reps)
            print(f"{size:>3} {tokens:>11} {sec * 1e3:>12.2f} {remote_bytes / 1e6:>9.1f} "
                  f"{remote_bytes / sec / 1e9:>6.2f} {copy * 1e3:>8.2f} {sec / copy:>7.1f} {sec / tokens * 1e6:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
