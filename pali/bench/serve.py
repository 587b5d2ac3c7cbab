"""Suite `serve`: requests/s and p50/p99 latency of the Serve app with dynamic batching against batch size 1.

Reuses the serving engineer's `benchmarks/serve_load.py` (one replica, the same closed-loop load of
`concurrency` clients, batching on then off) once per repeat; every figure is the median over repeats and
the ratio is taken within each repeat (side by side) before the median.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pali.bench.common import load_script, median


@dataclass
class ServeBenchConfig:
    """Load of the serving benchmark."""

    concurrency: int = 32
    """Closed-loop HTTP clients."""
    duration_s: float = 10.0
    """Seconds of load per mode and repeat."""
    max_new_tokens: int = 8
    """Tokens generated per request."""
    max_batch_size: int = 16
    """Batch size of the dynamic-batching mode."""
    repeats: int = 1
    """Load runs (each starts and stops Ray and Serve)."""


def run_serve(cfg: ServeBenchConfig) -> dict:
    """Medians per mode, the throughput ratio on/off and the p99 ratio on/off."""
    serve_load = load_script("serve_load").main
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # On a loaded 2-core machine the HTTP proxy misses Serve's 5 s readiness check and is killed.
    for var in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(var, "60")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(cfg.repeats):
            out = Path(tmp) / f"serve{i}.json"
            serve_load(["--concurrency", str(cfg.concurrency), "--duration", str(cfg.duration_s),
                        "--max-new-tokens", str(cfg.max_new_tokens), "--max-batch-size", str(cfg.max_batch_size),
                        "--torch-threads", "1", "--out", str(out)])
            runs.append(json.loads(out.read_text())["results"])
    res: dict = {"concurrency": cfg.concurrency, "duration_s": cfg.duration_s, "max_new_tokens": cfg.max_new_tokens,
                 "max_batch_size": cfg.max_batch_size, "runs": runs}
    for mode in ("batching_on", "batching_off"):
        res[mode] = {k: median([r[mode][k] for r in runs if r[mode][k] is not None])
                     for k in ("requests_per_s", "p50_ms", "p99_ms")}
        res[mode]["errors"] = sum(r[mode]["errors"] for r in runs)
    res["throughput_ratio"] = median([r["batching_on"]["requests_per_s"] / r["batching_off"]["requests_per_s"]
                                      for r in runs])
    res["p99_ratio_on_over_off"] = median([r["batching_on"]["p99_ms"] / r["batching_off"]["p99_ms"] for r in runs])
    return res
