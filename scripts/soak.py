"""Soak test (not in CI): a real server under mixed traffic for a long time, with aborts,
vanishing clients and malformed frames; afterwards, idle, the cache blocks and the processes'
memory must come back to their baseline.

    .venv/bin/python scripts/soak.py --minutes 30 [--checkpoint DIR] [--concurrency 16]

Exit status 0 when blocks return to zero use, nothing is left running, the server exits 0 on
SIGTERM and resident memory grew less than --max-rss-growth (fraction) over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from prometheus_client.parser import text_string_to_metric_families

from entrypoints.client import AsyncClient, ServerError
from entrypoints.protocol import Final


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def family(pid: int) -> list[int]:
    return [pid] + [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == pid]


def family_rss(pid: int) -> int:
    return sum(rss_kib(p) for p in family(pid))


def rss_breakdown(pid: int) -> str:
    return "+".join(f"{rss_kib(p) // 1024}" for p in family(pid))


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


async def client_loop(address: str, stop_at: float, rng: random.Random, counts: dict[str, int]) -> None:
    while time.monotonic() < stop_at:
        action = rng.choices(["complete", "abort", "vanish", "malformed"], [0.7, 0.15, 0.1, 0.05])[0]
        prompt = "".join(rng.choice("abcdefgh ijk") for _ in range(rng.randint(1, 300)))
        params = {"max_tokens": rng.randint(1, 200), "temperature": rng.choice([0.0, 0.7, 1.0]),
                  "ignore_eos": rng.random() < 0.5}
        c = AsyncClient(address, timeout_s=300)
        try:
            if action == "malformed":
                await c._sock.send(b"\xc1" + os.urandom(rng.randint(0, 64)))
                try:
                    await c.health()
                except ServerError as e:  # the typed refusal of the garbage frame
                    if e.code != "bad_message":
                        raise
                await c.health()  # and the server still answers
            else:
                cut = rng.randint(1, 5)
                n = 0
                async for ev in c.generate(prompt, params):
                    n += 1
                    if isinstance(ev, Final):
                        break
                    if action != "complete" and n >= cut:
                        if action == "abort":
                            await c.abort(ev.request_id)
                        else:
                            c.drop_connection()
                            break
            counts[action] += 1
        except ServerError as e:
            counts["error:" + e.code] = counts.get("error:" + e.code, 0) + 1
        finally:
            await c.close()


async def drive(address: str, minutes: float, concurrency: int, seed: int, report) -> dict[str, int]:
    counts = {"complete": 0, "abort": 0, "vanish": 0, "malformed": 0}
    stop_at = time.monotonic() + minutes * 60
    tasks = [asyncio.create_task(client_loop(address, stop_at, random.Random(seed + i), counts))
             for i in range(concurrency)]
    while not all(t.done() for t in tasks):
        await asyncio.wait(tasks, timeout=60)
        report(counts)
    await asyncio.gather(*tasks)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--checkpoint", default="checkpoints/tiny-seed0")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-rss-growth", type=float, default=0.10)
    args = ap.parse_args()
    # SIGTERM runs the `finally` below (which stops the server) instead of killing us outright.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").exists():
        from model.checkpoint_maker import make_checkpoint

        make_checkpoint("tiny", 0, ckpt)
    server = subprocess.Popen([sys.executable, "-m", "entrypoints.cli", "serve", "--model", str(ckpt), "--port", "0",
                               "--metrics-port", "0", "--kv-cache-memory", str(64 << 20), "--block-size", "16"],
                              stderr=subprocess.PIPE, text=True)
    try:
        m = re.search(r"on (tcp://\S+), metrics on (http://\S+)", server.stderr.readline())
        if not m:
            print("server did not start", file=sys.stderr)
            return 1
        address, url = m.groups()
        time.sleep(1.0)
        base_rss = family_rss(server.pid)
        start = time.monotonic()

        def report(counts):
            mt = metrics(url)
            print(f"[{(time.monotonic() - start) / 60:5.1f} min] {counts} "
                  f"running={mt.get('mlaserve:num_requests_running')} "
                  f"kv_use={mt.get('mlaserve:kv_cache_usage_perc', 0):.3f} "
                  f"rss={family_rss(server.pid) / 1024:.0f} MiB ({rss_breakdown(server.pid)})", flush=True)

        # A first minute warms every allocator up; the baseline is taken after it.
        asyncio.run(drive(address, min(1.0, args.minutes), args.concurrency, args.seed, report))
        time.sleep(3)
        base_rss = family_rss(server.pid)
        counts = asyncio.run(drive(address, args.minutes, args.concurrency, args.seed + 1000, report))
        time.sleep(3)  # idle
        mt = metrics(url)
        end_rss = family_rss(server.pid)
        growth = (end_rss - base_rss) / max(base_rss, 1)
        ok = mt.get("mlaserve:kv_cache_usage_perc", 1) == 0 and mt.get("mlaserve:num_requests_running", 1) == 0
        print(f"done: {counts}; idle kv use {mt.get('mlaserve:kv_cache_usage_perc')}, running "
              f"{mt.get('mlaserve:num_requests_running')}, waiting {mt.get('mlaserve:num_requests_waiting')}; "
              f"rss {base_rss / 1024:.0f} -> {end_rss / 1024:.0f} MiB ({100 * growth:+.1f}%)")
        ok = ok and growth < args.max_rss_growth
    finally:
        server.send_signal(signal.SIGTERM)
        rc = server.wait(timeout=120)
    print(f"server exit status {rc}")
    return 0 if ok and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
