"""Load test of the Serve application: requests/s and p50/p99 latency with batching on and off.

    python benchmarks/serve_load.py [--checkpoint CKPT] [--concurrency 32] [--duration 20] [--out result.json]

Without `--checkpoint` a tiny random model is made in a temp dir. Serves on 127.0.0.1 only; one replica
per run, so the two runs differ only in `max_batch_size` (16 vs 1). Prints and writes JSON that records
hardware, commit and date next to the numbers.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_checkpoint(out_dir: Path) -> Path:
    """A random tiny-preset checkpoint with a tokenizer trained on the prompt templates."""
    import pali
    from pali.config import get_preset
    from pali.data.prompts import prompt_templates
    from pali.tokenizer import Tokenizer

    tok = Tokenizer.train(prompt_templates() * 2 + ["a red circle", "un cercle rouge", "ein roter Kreis"],
                          vocab_size=1000)
    model = pali.create_model(get_preset("tiny").with_overrides(text__vocab_size=tok.vocab_size), seed=0)
    return pali.save_pretrained(model, tok, out_dir)


def image_b64(seed: int, size: int = 96) -> str:
    """A random PNG, base64-encoded."""
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def hardware() -> dict:
    """What the numbers were measured on."""
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def commit() -> str:
    """Current git commit (or 'unknown')."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_load(url: str, concurrency: int, duration: float, max_new_tokens: int) -> dict:
    """`concurrency` closed-loop clients for `duration` seconds; latency percentiles and throughput."""
    import requests

    bodies = [{"image": image_b64(i), "task": "caption", "lang": ["en", "fr", "zh", "ar"][i % 4],
               "max_new_tokens": max_new_tokens} for i in range(64)]
    lat: list[float] = []
    errors = [0]
    stop = time.time() + duration
    lock = threading.Lock()

    def client(k: int) -> None:
        s = requests.Session()
        i = k
        while time.time() < stop:
            t = time.perf_counter()
            r = s.post(url + "/v1/generate", json=bodies[i % len(bodies)], timeout=120)
            dt = time.perf_counter() - t
            with lock:
                if r.status_code == 200:
                    lat.append(dt)
                else:
                    errors[0] += 1
            i += concurrency

    start = time.time()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - start
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "errors": errors[0], "wall_s": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print and write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per mode")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=16, help="batch size of the 'batching on' run")
    p.add_argument("--torch-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--out", default=None, help="write the JSON result here")
    a = p.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from serve.app import build_app

    tmp = tempfile.TemporaryDirectory()
    ckpt = a.checkpoint or str(tiny_checkpoint(Path(tmp.name) / "tiny"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(a.torch_threads)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    results = {}
    try:
        for mode, mbs in (("batching_on", a.max_batch_size), ("batching_off", 1)):
            app = build_app({"models": {"default": ckpt}, "num_replicas": 1, "max_batch_size": mbs,
                             "max_ongoing_requests": max(a.concurrency, mbs), "num_cpus": 0.5,
                             "torch_threads": a.torch_threads, "batch_wait_timeout_s": 0.01})
            serve.run(app, name="bench", route_prefix="/")
            run_load(url, min(a.concurrency, 4), 2.0, a.max_new_tokens)  # warm-up
            res = run_load(url, a.concurrency, a.duration, a.max_new_tokens)
            import requests

            res["batch_sizes"] = requests.get(url + "/v1/stats", timeout=30).json()["batch_sizes"]
            results[mode] = res
            print(f"{mode:13s} max_batch_size={mbs:3d}  {res['requests_per_s']:8.2f} req/s  "
                  f"p50 {res['p50_ms']} ms  p99 {res['p99_ms']} ms  errors {res['errors']}", flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    out = {"benchmark": "serve_load", "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "commit": commit(), "hardware": hardware(), "checkpoint": a.checkpoint or "random tiny preset",
           "concurrency": a.concurrency, "duration_s": a.duration, "max_new_tokens": a.max_new_tokens,
           "results": results}
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
