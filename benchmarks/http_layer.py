"""What the HTTP app itself adds to a request's first token: one AsyncLLM in this process, the
same requests taking turns through it directly (the peer) and through the OpenAI app over an
in-process ASGI transport (FastAPI routing, the body's parsing and checks, the first SSE chunk),
without sockets or the openai client. With --max-tokens 1 (the default) the first chunk is the
whole answer, which the ASGI transport needs: it hands the body over when it is complete.

    .venv/bin/python benchmarks/http_layer.py [--requests 30] [--checkpoint checkpoints/small-seed0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import httpx2  # noqa: E402 - the openai client's HTTP library

from engine.config import EngineConfig  # noqa: E402
from entrypoints.async_llm import AsyncLLM  # noqa: E402
from entrypoints.openai_server import OpenAIServer  # noqa: E402


async def measure(llm: AsyncLLM, requests: int, max_tokens: int) -> tuple[list[float], list[float]]:
    app = OpenAIServer(llm, "m").app
    direct, through_app = [], []
    params = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://app") as client:
        for i in range(requests):
            start = time.perf_counter()
            ids, p = await llm.prepare([5 + i, 6, 7, 8] * 8, params)
            async for _ in llm.generate(ids, p, f"direct-{i}"):
                direct.append(time.perf_counter() - start)
                break
            await asyncio.sleep(0.05)
            start = time.perf_counter()
            body = {"prompt": [9 + i, 6, 7, 8] * 8, "stream": True, **params}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        through_app.append(time.perf_counter() - start)
                        break
            await asyncio.sleep(0.05)
    return direct, through_app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/small-seed0")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=1)
    args = ap.parse_args()
    from model.checkpoint_maker import ensure_checkpoint

    ckpt = ensure_checkpoint(args.checkpoint, "small" if "small" in Path(args.checkpoint).name else "tiny")

    async def run():
        llm = AsyncLLM(EngineConfig(str(ckpt), kv_cache_memory=1 << 30))
        try:
            llm.start(asyncio.get_running_loop())
            return await measure(llm, args.requests, args.max_tokens)
        finally:
            llm.shutdown()

    direct, through_app = asyncio.run(run())
    d, a = (1000 * statistics.median(v[5:]) for v in (direct, through_app))  # the first 5 warm up
    print(f"{args.requests} requests each way, median of the last {args.requests - 5}: first chunk through the "
          f"app {a:.2f} ms, directly through AsyncLLM {d:.2f} ms: the app adds {a - d:+.2f} ms ({a / d:.3f}x)")


if __name__ == "__main__":
    main()
