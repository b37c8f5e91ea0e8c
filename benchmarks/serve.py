"""Online serving benchmark: Poisson arrivals against a running `mlaserve serve`, in the style of
vLLM's and SGLang's serving benchmarks (TTFT, inter-token latency, end-to-end latency, output
throughput). The peer measured in the same run is the engine's own offline throughput on the
same requests (LLM.generate, all at once): the ratio says what serving costs on top.

    .venv/bin/python benchmarks/serve.py --rate 8 --num-requests 200            # starts a server
    .venv/bin/python benchmarks/serve.py --address tcp://host:5555 --rate 8     # an existing one

With --priority-fraction F the same arrivals run twice, on a first-come-first-served server and
on one started with --scheduling-policy priority, where a random F of the requests carry
priority 0 and the rest 1; it prints each class's latencies under both (the peer is the FCFS run).

    .venv/bin/python benchmarks/serve.py --rate 8 --num-requests 100 --max-num-seqs 16 --priority-fraction 0.1

With --endpoint http the same arrivals go through the OpenAI-compatible HTTP server (`serve
--http-port`) with the official `openai` streaming client, alternating with the ZeroMQ endpoint
(--rounds times each, a fresh server per run): it prints the HTTP/ZeroMQ ratio of output
throughput and the difference of median TTFT. Each HTTP server is driven twice: by the `openai`
client and by a light one (httpx streaming the SSE lines, json per chunk), so the print tells
what the HTTP server costs apart from what the openai SDK costs its caller; beside each, the
client's own time to a first chunk from an instant in-process server (no network, no engine).

    .venv/bin/python benchmarks/serve.py --endpoint http --rate 8 --num-requests 100 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from entrypoints.client import AsyncClient
from entrypoints.protocol import Delta, Final


def workload(n: int, seed: int, in_range, out_range) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(2, 258) for _ in range(rng.randint(*in_range))], rng.randint(*out_range))
            for _ in range(n)]


async def one(client: AsyncClient, prompt: list[int], out_len: int, delay: float, rec: list,
              priority: int = 0, label: int = 0) -> None:
    await asyncio.sleep(delay)
    start = time.perf_counter()
    times: list[float] = []
    n_tokens = 0
    async for ev in client.generate(prompt, {"max_tokens": out_len, "ignore_eos": True, "temperature": 0.0},
                                    priority=priority):
        now = time.perf_counter()
        if isinstance(ev, Delta) and ev.token_ids:
            times.extend([now] * len(ev.token_ids))
            n_tokens += len(ev.token_ids)
        elif isinstance(ev, Final):
            rec.append({"start": start, "token_times": times, "end": now, "tokens": len(ev.token_ids),
                        "label": label})


def arrival_delays(n: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request arrives: Poisson at `rate` (0: all at once)."""
    rng = random.Random(seed + 1)
    delays, t = [], 0.0
    for _ in range(n):
        delays.append(t)
        t += rng.expovariate(rate) if rate > 0 else 0.0
    return delays


async def run(address: str, reqs, rate: float, seed: int, priorities=None, labels=None) -> tuple[list[dict], float]:
    """labels: a class per request, recorded with its latencies."""
    delays = arrival_delays(len(reqs), rate, seed)
    rec: list[dict] = []
    async with AsyncClient(address, timeout_s=600) as client:
        start = time.perf_counter()
        priorities = priorities or [0] * len(reqs)
        labels = labels or [0] * len(reqs)
        await asyncio.gather(*(one(client, p, n, d, rec, pr, lb)
                               for (p, n), d, pr, lb in zip(reqs, delays, priorities, labels)))
        return rec, time.perf_counter() - start


async def one_http(client, model: str, prompt: list[int], out_len: int, delay: float, rec: list) -> None:
    await asyncio.sleep(delay)
    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=out_len, temperature=0.0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            times.append(now)  # a chunk per step that made tokens (without speculation: one token)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    rec.append({"start": start, "token_times": times, "end": time.perf_counter(), "tokens": tokens, "label": 0})


async def run_http(url: str, model: str, reqs, rate: float, seed: int) -> tuple[list[dict], float]:
    import openai

    delays = arrival_delays(len(reqs), rate, seed)
    rec: list[dict] = []
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    try:
        start = time.perf_counter()
        await asyncio.gather(*(one_http(client, model, p, n, d, rec) for (p, n), d in zip(reqs, delays)))
        return rec, time.perf_counter() - start
    finally:
        await client.close()


async def one_sse(client, url: str, model: str, prompt: list[int], out_len: int, delay: float, rec: list) -> None:
    await asyncio.sleep(delay)
    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                times.append(now)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    rec.append({"start": start, "token_times": times, "end": time.perf_counter(), "tokens": tokens, "label": 0})


async def run_sse(url: str, model: str, reqs, rate: float, seed: int) -> tuple[list[dict], float]:
    httpx = _httpx()
    delays = arrival_delays(len(reqs), rate, seed)
    rec: list[dict] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one_sse(client, url, model, p, n, d, rec) for (p, n), d in zip(reqs, delays)))
        return rec, time.perf_counter() - start


def _httpx():
    try:  # the HTTP client the openai SDK is built on (renamed httpx2 in its 3.x line)
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx


async def client_self_cost(rounds: int = 300) -> dict[str, float]:
    """Median ms from the call to the first chunk of each client against an instant in-process
    server (httpx's MockTransport, one canned SSE chunk): what the client itself spends per
    request, with no network, server or engine in it."""
    import openai

    httpx = _httpx()
    chunk = {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "m",
             "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None}]}
    body = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()

    def transport():
        return httpx.MockTransport(lambda _: httpx.Response(200, headers={"content-type": "text/event-stream"},
                                                            content=body))

    prompt = list(range(2, 130))
    sdk = openai.AsyncOpenAI(base_url="http://bench/v1", api_key="none", http_client=httpx.AsyncClient(
        transport=transport()))
    light = httpx.AsyncClient(transport=transport())
    times: dict[str, list[float]] = {"openai": [], "sse": []}
    for _ in range(rounds):
        start = time.perf_counter()
        stream = await sdk.completions.create(model="m", prompt=prompt, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for _chunk in stream:
            times["openai"].append(time.perf_counter() - start)
            break
        await stream.close()
        start = time.perf_counter()
        async with light.stream("POST", "http://bench/v1/completions", json={"model": "m", "prompt": prompt}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    json.loads(line[6:])
                    times["sse"].append(time.perf_counter() - start)
                    break
    await sdk.close()
    await light.aclose()
    return {k: 1000 * statistics.median(v[rounds // 5:]) for k, v in times.items()}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(rec: list[dict], elapsed: float) -> dict:
    ttft = [r["token_times"][0] - r["start"] for r in rec if r["token_times"]]
    itl = [b - a for r in rec for a, b in zip(r["token_times"], r["token_times"][1:])]
    e2e = [r["end"] - r["start"] for r in rec]
    out_tokens = sum(r["tokens"] for r in rec)
    return {"requests": len(rec), "elapsed_s": elapsed, "req_per_s": len(rec) / elapsed,
            "output_tok_per_s": out_tokens / elapsed,
            **{f"{name}_p{q}_ms": 1000 * pct(v, q) for name, v in (("ttft", ttft), ("itl", itl), ("e2e", e2e))
               for q in (50, 90, 99)},
            "ttft_mean_ms": 1000 * statistics.fmean(ttft) if ttft else float("nan")}


def offline_throughput(ckpt: str, reqs, engine_args: dict) -> float:
    from engine import LLM, SamplingParams

    with LLM(ckpt, **engine_args) as llm:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate([p for p, _ in reqs], [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0)
                                                   for _, n in reqs], use_tqdm=False)
        elapsed = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", help="a running server; without it one is started on --checkpoint")
    ap.add_argument("--checkpoint", default="checkpoints/small-seed0")
    ap.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson); 0 = all at once")
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--input-len", type=int, nargs=2, default=[32, 256])
    ap.add_argument("--output-len", type=int, nargs=2, default=[32, 128])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-memory", type=int, default=2 << 30)
    ap.add_argument("--skip-offline", action="store_true", help="do not measure the offline peer")
    ap.add_argument("--no-async-scheduling", action="store_true",
                    help="start the server planning each step after the last returns")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="the server's (default: its own default)")
    ap.add_argument("--endpoint", choices=["zmq", "http"], default="zmq",
                    help="http: compare the HTTP server with the ZeroMQ endpoint on the same arrivals")
    ap.add_argument("--rounds", type=int, default=2, help="with --endpoint http: runs of each, alternating")
    ap.add_argument("--priority-fraction", type=float, default=0.0,
                    help="compare FCFS with the priority policy, this fraction of requests at priority 0")
    args = ap.parse_args()
    reqs = workload(args.num_requests, args.seed, args.input_len, args.output_len)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # so `finally` stops the server we start
    if args.priority_fraction > 0:
        compare_policies(args, reqs)
        return
    if args.endpoint == "http":
        compare_endpoints(args, reqs)
        return
    rec, elapsed = serve_once(args, reqs)
    s = summarize(rec, elapsed)
    print(f"rate {args.rate}/s, {s['requests']} requests in {s['elapsed_s']:.1f} s: {s['req_per_s']:.2f} req/s, "
          f"{s['output_tok_per_s']:.1f} output tok/s")
    for name in ("ttft", "itl", "e2e"):
        print(f"  {name.upper():4s} p50 {s[f'{name}_p50_ms']:9.1f} ms   p90 {s[f'{name}_p90_ms']:9.1f} ms   "
              f"p99 {s[f'{name}_p99_ms']:9.1f} ms")
    if args.address is None and not args.skip_offline:
        peer = offline_throughput(args.checkpoint, reqs, {"kv_cache_memory": args.kv_cache_memory})
        print(f"offline LLM.generate on the same requests: {peer:.1f} output tok/s; served/offline = "
              f"{s['output_tok_per_s'] / peer:.2f} (below 1 where arrivals, not the engine, set the pace)")


def serve_once(args, reqs, policy: str | None = None, priorities=None, labels=None) -> tuple[list[dict], float]:
    """The workload against --address, or against a server started here (with --scheduling-policy
    `policy` when given) and stopped after."""
    server, address = None, args.address
    if address is None:
        server, address = start_server(args, ["--scheduling-policy", policy] if policy else [])
    try:
        asyncio.run(run(address, reqs[:2], 0, args.seed))  # warm-up
        return asyncio.run(run(address, reqs, args.rate, args.seed, priorities, labels))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)


def serve_http_once(args, reqs) -> dict[str, tuple[list[dict], float]]:
    """The workload through one HTTP server twice: with the openai client, then the light one."""
    server, url, model = start_server(args, [], http=True)
    try:
        asyncio.run(run_http(url, model, reqs[:2], 0, args.seed))  # warm-up
        return {client: asyncio.run(run(url, model, reqs, args.rate, args.seed))
                for client, run in (("openai", run_http), ("sse", run_sse))}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def compare_endpoints(args, reqs) -> None:
    if args.address is not None:
        sys.exit("--endpoint http starts its own servers: leave out --address")
    runs: dict[str, list[dict]] = {"zmq": [], "openai": [], "sse": []}
    for r in range(args.rounds):
        results = {"zmq": serve_once(args, reqs), **serve_http_once(args, reqs)}
        for kind, (rec, elapsed) in results.items():
            s = summarize(rec, elapsed)
            runs[kind].append(s)
            print(f"round {r} {kind:6s}: {s['output_tok_per_s']:8.1f} output tok/s, TTFT p50 "
                  f"{s['ttft_p50_ms']:8.1f} ms, ITL p50 {s['itl_p50_ms']:7.1f} ms, E2E p50 {s['e2e_p50_ms']:8.1f} ms",
                  flush=True)
    tput = {e: statistics.median(s["output_tok_per_s"] for s in v) for e, v in runs.items()}
    ttft = {e: statistics.median(s["ttft_p50_ms"] for s in v) for e, v in runs.items()}
    print(f"rate {args.rate}/s, {len(reqs)} requests, median of {args.rounds} runs each, against the ZeroMQ endpoint "
          f"({tput['zmq']:.1f} tok/s, TTFT p50 {ttft['zmq']:.1f} ms):")
    own = asyncio.run(client_self_cost())
    for kind, label in (("openai", "HTTP, openai client"), ("sse", "HTTP, light SSE client")):
        print(f"  {label:24s} output throughput {tput[kind] / tput['zmq']:.3f}x ({tput[kind]:.1f} tok/s), "
              f"median TTFT {ttft[kind] - ttft['zmq']:+.1f} ms ({ttft[kind]:.1f} ms); the client's own time "
              f"to a first chunk from an instant in-process server: {own[kind]:.2f} ms")


def start_server(args, flags: list[str], http: bool = False):
    """(process, address) of a ZeroMQ server, or (process, url, model name) of an HTTP one."""
    from model.checkpoint_maker import ensure_checkpoint

    ckpt = ensure_checkpoint(args.checkpoint, "small" if "small" in Path(args.checkpoint).name else "tiny")
    endpoint = ["--http-port", "0"] if http else [
        "--port", "0", "--metrics-port", "0",
        # one socket stands for every simulated user here
        "--max-completions-per-client", "1000000", "--max-prompt-tokens-per-client", "1000000000"]
    server = subprocess.Popen([sys.executable, "-m", "entrypoints.cli", "serve", "--model", str(ckpt),
                               "--kv-cache-memory", str(args.kv_cache_memory), *endpoint]
                              + ["--no-async-scheduling"] * args.no_async_scheduling + flags
                              + (["--max-num-seqs", str(args.max_num_seqs)] if args.max_num_seqs else []),
                              stderr=subprocess.PIPE, text=True)
    m, seen = None, []
    while m is None and len(seen) < 50:  # log lines (a warning, say) may come first
        line = server.stderr.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(r"as '([^']+)' on (http://\S+)/v1" if http else r"on (tcp://[^\s,]+)", line)
    if not m:
        server.send_signal(signal.SIGTERM)  # its own shutdown stops its engine processes
        server.wait(timeout=120)
        sys.exit("the server did not start: " + "".join(seen))
    return (server, m.group(2), m.group(1)) if http else (server, m.group(1))


def compare_policies(args, reqs) -> None:
    if args.address is not None:
        sys.exit("--priority-fraction starts its own two servers: leave out --address")
    rng = random.Random(args.seed + 2)
    priorities = [0 if rng.random() < args.priority_fraction else 1 for _ in reqs]
    runs = {"fcfs": serve_once(args, reqs, "fcfs", labels=priorities),
            "priority": serve_once(args, reqs, "priority", priorities, priorities)}
    print(f"rate {args.rate}/s, {len(reqs)} requests, {priorities.count(0)} of them at priority 0 "
          "(sent without one to the FCFS server)")
    for policy, (rec, elapsed) in runs.items():
        print(f"{policy}: {summarize(rec, elapsed)['output_tok_per_s']:.1f} output tok/s")
    for label in (0, 1):
        for policy, (rec, elapsed) in runs.items():
            s = summarize([r for r in rec if r["label"] == label], elapsed)
            print(f"  priority-{label} requests under {policy:8s}: TTFT p50 {s['ttft_p50_ms']:8.1f} ms  "
                  f"p90 {s['ttft_p90_ms']:8.1f} ms   E2E p50 {s['e2e_p50_ms']:8.1f} ms  p90 {s['e2e_p90_ms']:8.1f} ms")


if __name__ == "__main__":
    main()
