"""Suite `serve`: requests/s and p50/p99 latency of the Serve app with dynamic batching against batch size 1.

Reuses the serving engineer's `pali/bench/serve_load.py`, once per HTTP ingress (`serve.config.INGRESS_ENV`:
Serve's Python proxy, then HAProxy with direct ingress), each in its own process and Ray session (the
ingress is fixed when Ray starts): one replica, the same closed-loop load of `concurrency` clients from
one asyncio process, batching on and off alternating within the session (on off, off on, ...: `repeats`
rounds). Every figure is the median over rounds and the ratio is taken within each round (side by side)
before the median. The per-request CPU of the load generator, ingress and replica and the machine's busy
cores come from the same runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pali.bench.common import REPO, median

INGRESS_NAMES = {"proxy": "Serve HTTP proxy (default)", "haproxy": "HAProxy + direct ingress"}
"""Ingress -> how the report names it."""


@dataclass
class ServeBenchConfig:
    """Load of the serving benchmark."""

    concurrency: int = 32
    """Closed-loop HTTP clients."""
    duration_s: float = 10.0
    """Seconds of load per mode and round."""
    max_new_tokens: int = 8
    """Tokens generated per request."""
    max_batch_size: int = 16
    """Batch size of the dynamic-batching mode."""
    repeats: int = 1
    """Rounds of both modes (alternating which goes first) in one Ray session."""
    ingresses: tuple[str, ...] = ("proxy", "haproxy")
    """HTTP ingresses to measure, each in its own Ray session."""
    in_process_repeats: int = 3
    """Repeats of the in-process (no HTTP) batch-vs-single measurement of the replica's decode path."""
    start_attempts: int = 2
    """Tries when Ray or Serve fails to start (start-up timeouts on a loaded machine)."""
    poisson_rates: tuple[float, ...] = (4, 8, 16, 24, 32)
    """Arrival rates (requests/s) of the open-loop Poisson run (`pali.bench.serve_poisson`); empty skips it."""
    poisson_duration_s: float = 8.0
    """Seconds of arrivals per rate and mode."""


def load_run(cfg: ServeBenchConfig, ingress: str) -> dict:
    """The JSON of one `serve_load.py --ingress INGRESS` run in a fresh process (retried once when Ray or
    Serve fails to start on a loaded machine)."""
    env = dict(os.environ)
    # On a loaded 2-core machine the HTTP proxy misses Serve's 5 s readiness check and is killed.
    for var in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        env.setdefault(var, "60")
    timeout = 240 + cfg.repeats * 2 * (cfg.duration_s + 90)
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "serve.json", Path(tmp) / "serve.log"
        argv = [sys.executable, "-m", "pali.bench.serve_load", "--concurrency", str(cfg.concurrency), "--duration",
                str(cfg.duration_s), "--rounds", str(cfg.repeats), "--max-new-tokens", str(cfg.max_new_tokens),
                "--max-batch-size", str(cfg.max_batch_size), "--torch-threads", "1", "--ingress", ingress,
                "--out", str(out)]
        for attempt in range(cfg.start_attempts):
            with open(log, "w") as f:
                try:
                    rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                        timeout=timeout).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            if rc == 0 and out.is_file():
                return json.loads(out.read_text())
            tail = log.read_text(errors="replace")[-2000:]
            if attempt + 1 == cfg.start_attempts:
                raise RuntimeError(f"serve_load.py --ingress {ingress} failed ({rc}); its output ends:\n{tail}")
            print(f"[serve] {ingress} load run failed ({rc}); retrying", file=sys.stderr)
    raise ValueError(f"start_attempts={cfg.start_attempts}; expected >= 1")


def summarise(load: dict) -> dict:
    """Medians per mode with per-request CPU, the throughput ratio on/off and the p99 ratio on/off."""
    res: dict = {"batch_wait_timeout_s": load["batch_wait_timeout_s"], "runs": load["runs"]}
    for mode in ("batching_on", "batching_off"):
        res[mode] = dict(load["results"][mode])
        mine = [r for r in load["runs"] if r["mode"] == mode and r.get("cpu")]
        if mine:
            res[mode]["cpu_ms_per_request"] = {k.removesuffix("_ms_per_request"): median([r["cpu"][k] for r in mine])
                                               for k in mine[0]["cpu"] if k.endswith("_ms_per_request")}
            res[mode]["machine_busy_cores"] = median([r["cpu"]["machine_busy_cores"] for r in mine])
            res[mode]["load_avg_1m"] = median([r["load_avg_at_start"][0] for r in mine])
    res["throughput_ratio"] = median(load["throughput_ratios"])
    res["p99_ratio_on_over_off"] = median(load["p99_ratios"])
    return res


def run_serve(cfg: ServeBenchConfig) -> dict:
    """Per ingress: medians per mode, the throughput ratio on/off and the p99 ratio on/off (both per round,
    then median); and the replica's decode path without HTTP."""
    res: dict = {"concurrency": cfg.concurrency, "duration_s": cfg.duration_s, "max_new_tokens": cfg.max_new_tokens,
                 "max_batch_size": cfg.max_batch_size, "rounds": cfg.repeats, "ingress": {}}
    for ingress in cfg.ingresses:
        res["ingress"][ingress] = summarise(load_run(cfg, ingress))
    res["in_process"] = replica_batching(cfg.max_batch_size, cfg.max_new_tokens, cfg.in_process_repeats)
    if cfg.poisson_rates:
        res["poisson"] = poisson_run(cfg)
    return res


def poisson_run(cfg: ServeBenchConfig) -> dict:
    """The JSON of one `pali.bench.serve_poisson` run (iteration vs whole-call batching vs batch size 1) in a
    fresh process and Ray session; its markdown table is under `markdown`."""
    from pali.bench.serve_poisson import to_markdown

    env = dict(os.environ)
    for var in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        env.setdefault(var, "60")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "poisson.json"
        rates = ",".join(f"{r:g}" for r in cfg.poisson_rates)
        argv = [sys.executable, "-m", "pali.bench.serve_poisson", "--rates", rates, "--duration",
                str(cfg.poisson_duration_s), "--out", str(out)]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"serve_poisson failed ({proc.returncode}); its output ends:\n{proc.stdout[-2000:]}"
                               f"{proc.stderr[-2000:]}")
        res = json.loads(out.read_text())
    res["markdown"] = to_markdown(res)
    return res


def replica_batching(batch_size: int, max_new_tokens: int, repeats: int) -> dict:
    """The replica's own decode path (`serve.engine.decode_items`) without HTTP: `batch_size` requests as
    one batch against the same requests one at a time, side by side. This is the most dynamic batching
    can gain; the HTTP proxy and clients' per-request CPU cost come on top in the load test."""
    import numpy as np
    import torch

    from pali.bench import serve_load as script
    from pali.bench.common import time_side_by_side
    from serve.engine import DecodeParams, Item, decode_items, encode_prompt, load_model, make_prompt

    with tempfile.TemporaryDirectory() as tmp:
        entry = load_model("default", str(script.tiny_checkpoint(Path(tmp) / "tiny")))
    rng = np.random.default_rng(0)
    params = DecodeParams(max_new_tokens=max_new_tokens)
    items = [Item(entry=entry, pixels=rng.standard_normal((3, entry.image_size, entry.image_size), dtype=np.float32),
                  input_ids=encode_prompt(entry, make_prompt("caption", lang, None)), params=params)
             for lang in (["en", "fr", "zh", "ar"] * batch_size)[:batch_size]]
    with torch.no_grad():
        times = time_side_by_side({"batched": lambda: decode_items(items),
                                   "one_by_one": lambda: [decode_items([it]) for it in items]}, repeats, warmup=1)
    on, off = median(times["batched"]), median(times["one_by_one"])
    return {"batch_size": batch_size, "requests_per_s_batched": batch_size / on,
            "requests_per_s_one_by_one": batch_size / off, "ratio": off / on, "times": times}
