"""Open-loop Poisson load on the Serve application: iteration-level vs whole-call batching vs batch size 1.

    python -m pali.bench.serve_poisson [--checkpoint CKPT] [--rates 2,4,8,16] [--duration 10] [--out r.json]

Iteration batching runs with 32 cache rows (so a short request finds a row free next to 16 long ones),
whole-call batching with its tuned 16 per batch and a 0.1 s batch wait. Requests arrive at exponential
gaps (rate r per second, seeded), each asking for a `max_new_tokens`
drawn uniformly from 2..32, on Serve's default ingress, one replica on 127.0.0.1. Per mode and rate:
requests/s completed, tokens/s, p50 / p99 latency and time to first token (the iteration engine's
`x-pali-ttft-s` header: queue wait + prefill + one step; whole-call modes answer at once, so theirs is the
latency).
Then a short request (2 new tokens) is timed alone and under 16 long ones (32 tokens) in flight.
Prints a markdown table and writes JSON with hardware, commit and date. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pali.bench.serve_load import commit, hardware, image_b64, tiny_checkpoint

MODES = {
    "iteration": {"batching": "iteration", "max_batch_size": 32},
    "whole_call": {"batching": "whole_call", "max_batch_size": 16, "batch_wait_timeout_s": 0.1},
    "batch_1": {"batching": "whole_call", "max_batch_size": 1},
}
"""Mode -> AppArgs overrides."""


def bodies(n: int, seed: int = 0) -> list[tuple[int, dict]]:
    """(max_new_tokens, body) of n requests: 8 images, 4 languages, max_new_tokens uniform in 2..32."""
    rng = np.random.default_rng(seed)
    imgs = [image_b64(i, 64) for i in range(8)]
    out = []
    for i in range(n):
        m = int(rng.integers(2, 33))
        out.append((m, {"image": imgs[i % 8], "task": "caption", "lang": ["en", "fr", "zh", "ar"][i % 4],
                        "max_new_tokens": m}))
    return out


async def _one(session, url: str, body: dict, stream: bool) -> tuple[float, float, int, int]:
    """(latency, time to first token, tokens, status) of one request."""
    t0 = time.perf_counter()
    ttft = None
    async with session.post(url + "/v1/generate", json={**body, "stream": stream}) as r:
        if r.status != 200:
            await r.read()
            return time.perf_counter() - t0, time.perf_counter() - t0, 0, r.status
        if not stream:
            data = await r.json()
            t = time.perf_counter() - t0
            # the iteration engine names its time to first token (queue + prefill + one step) in a header;
            # whole-call batching answers everything at once, so its first token comes with the answer
            ttft = float(r.headers.get("x-pali-ttft-s", t))
            return t, min(t, ttft), len(data["tokens"]), 200
        tokens = 0
        async for line in r.content:
            if ttft is None and line.startswith(b"data:"):
                ttft = time.perf_counter() - t0
            if line.startswith(b"data:") and b'"tokens"' in line:
                tokens = len(json.loads(line[5:])["tokens"])
    t = time.perf_counter() - t0
    return t, ttft if ttft is not None else t, tokens, 200


async def poisson(url: str, rate: float, duration: float, stream: bool, seed: int = 0) -> dict:
    """Open-loop arrivals at `rate`/s for `duration` s; figures of the requests that arrived."""
    import aiohttp

    rng = np.random.default_rng(seed)
    n = max(1, int(rate * duration))
    gaps = rng.exponential(1.0 / rate, n)
    reqs = bodies(n, seed)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as s:
        t0 = time.perf_counter()
        tasks = []
        start = t0
        for gap, (_, body) in zip(gaps, reqs, strict=True):
            start += gap
            await asyncio.sleep(max(0.0, start - time.perf_counter()))
            tasks.append(asyncio.create_task(_one(s, url, body, stream)))
        res = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = [r for r in res if r[3] == 200]
    lat = np.array([r[0] for r in ok]) if ok else np.array([np.nan])
    ttft = np.array([r[1] for r in ok]) if ok else np.array([np.nan])
    return {"rate": rate, "requests": n, "ok": len(ok), "req_per_s": round(len(ok) / wall, 2),
            "tokens_per_s": round(sum(r[2] for r in ok) / wall, 1),
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p99_s": round(float(np.percentile(lat, 99)), 3),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
            "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3)}


async def short_under_long(url: str, stream: bool) -> dict:
    """Latency of a 2-token request alone, then while 16 requests of 32 tokens decode."""
    import aiohttp

    short = {"image": image_b64(99, 64), "task": "caption", "lang": "en", "max_new_tokens": 2}
    long = {"image": image_b64(98, 64), "task": "caption", "lang": "fr", "max_new_tokens": 32}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        idle = sorted([(await _one(s, url, short, False))[0] for _ in range(5)])[2]
        longs = [asyncio.create_task(_one(s, url, long, stream)) for _ in range(16)]
        await asyncio.sleep(0.3)
        busy = (await _one(s, url, short, False))[0]
        await asyncio.gather(*longs)
    return {"idle_s": round(idle, 3), "under_16_long_s": round(busy, 3), "ratio": round(busy / idle, 2)}


def main(argv: list[str] | None = None) -> int:
    """Run every mode at every rate and print the table."""
    p = argparse.ArgumentParser(prog="python -m pali.bench.serve_poisson", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--rates", default="2,4,8,16")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rates = [float(r) for r in a.rates.split(",")]
    import ray
    from ray import serve

    from pali.bench.serve_load import _start_serve
    from serve.app import build_app

    tmp = tempfile.mkdtemp()
    ckpt = a.checkpoint or str(tiny_checkpoint(Path(tmp) / "tiny"))
    url = _start_serve(a.torch_threads)
    out = {"hardware": hardware(), "commit": commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "duration_s": a.duration, "modes": {}}
    try:
        for mode in a.modes.split(","):
            args = {"models": {"default": ckpt}, "num_replicas": 1, "max_ongoing_requests": 256,
                    "max_queued_requests": 256, "num_cpus": 1, "torch_threads": a.torch_threads, **MODES[mode]}
            serve.run(build_app(args), name="pali", route_prefix="/")
            stream = False  # SSE through Serve's proxy costs a Ray message per piece; TTFT comes from a header
            asyncio.run(poisson(url, 2.0, 2.0, stream, seed=99))  # warm-up
            rows = [asyncio.run(poisson(url, r, a.duration, stream)) for r in rates]
            out["modes"][mode] = {"rates": rows, "short_under_long": asyncio.run(short_under_long(url, stream))}
            print(mode, json.dumps(out["modes"][mode]), flush=True)
            serve.delete("pali")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(to_markdown(out))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))
    return 0


def to_markdown(out: dict) -> str:
    """The table of a run."""
    lines = [f"{out['hardware']['cpu_count']} CPUs, commit {out['commit'][:7]}, {out['date']}, "
             f"{out['duration_s']} s per rate", "",
             "| mode | rate/s | req/s | tokens/s | p50 s | p99 s | TTFT p50 s | TTFT p99 s |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, m in out["modes"].items():
        for r in m["rates"]:
            lines.append(f"| {mode} | {r['rate']:g} | {r['req_per_s']} | {r['tokens_per_s']} | {r['p50_s']} | "
                         f"{r['p99_s']} | {r['ttft_p50_s']} | {r['ttft_p99_s']} |")
    lines += ["", "| mode | short alone s | short under 16 long s | ratio |", "|---|---|---|---|"]
    for mode, m in out["modes"].items():
        s = m["short_under_long"]
        lines.append(f"| {mode} | {s['idle_s']} | {s['under_16_long_s']} | {s['ratio']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
