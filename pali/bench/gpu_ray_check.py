"""The GPU path end to end through Ray: `jobs.pretrain --use-gpu` (Ray Train worker on a GPU, nccl, bf16
autocast, Ray Data feeding it), then the resulting checkpoint served by `python -m serve` on the GPU and
queried over HTTP (single requests, a concurrent burst that must batch, a bad request that must be a 4xx).

    python -m pali.bench.gpu_ray_check --out DIR [--steps 500] [--workers 1]

Prints a summary and writes DIR/gpu_ray.json. Needs a CUDA GPU, Ray and this package; `--cpu` runs the
same flow without `--use-gpu` (a smoke run on a machine without one).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]  # the checkout: the job runs from there (its data/ and runs/)

LANGS = ("en", "fr", "ru", "ar", "hi", "zh")


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


def train(out: Path, steps: int, workers: int, cpu: bool, timeout: float) -> dict:
    """Run the main job on the GPU; its summary, last metrics record and wall time."""
    run = out / "run"
    cmd = [sys.executable, "-m", "jobs.pretrain", "--steps", str(steps), "--workers", str(workers),
           "--output-dir", str(run), "--num-cpus", str(max(8, os.cpu_count() or 8)),
           "--threads-per-worker", "4", "--checkpoint-every", str(max(steps // 2, 1))]
    if not cpu:
        cmd.append("--use-gpu")
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    res: dict = {"command": " ".join(cmd[1:]), "returncode": p.returncode, "seconds": time.time() - t0}
    (out / "pretrain.log").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    print(_tail(p.stdout, 60), flush=True)
    if p.returncode != 0:
        res["stderr_tail"] = _tail(p.stderr, 30)
        return res
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    res.update(checkpoint=summary["checkpoint"], heldout=summary.get("heldout"), eval=summary.get("eval"),
               last_record=records[-1] if records else None,
               first_loss=records[0]["loss"] if records else None)
    return res


def _example(i: int) -> tuple[str, dict]:
    from pali.data.synthetic import make_example

    row = make_example(i, seed=1000, langs=LANGS)
    return base64.b64encode(row["image"]).decode(), row


def serve_and_query(ckpt: str, out: Path, port: int, burst: int, timeout: float) -> dict:
    """Start `python -m serve` on the checkpoint, query it, stop it."""
    url = f"http://127.0.0.1:{port}"
    log = open(out / "serve.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "serve", "--checkpoint", ckpt, "--port", str(port),
                          "--num-replicas", "1", "--max-batch-size", "32", "--batch-wait-timeout-s", "0.02"],
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    res: dict = {}
    try:
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if p.poll() is not None:
                raise RuntimeError(f"serve exited with {p.returncode}")
            time.sleep(1)
        else:
            raise TimeoutError(f"serve not healthy after {timeout:.0f} s")
        res["startup_s"] = time.time() - t0
        samples = []
        for i in range(6):
            img, row = _example(i)
            asks = [("caption", None, row["text"]), ("vqa", row["question"], row["answer"])]
            if row["ocr_text"]:
                asks.append(("ocr", None, row["ocr_text"]))
            for task, prompt, ref in asks:
                t = time.time()
                r = requests.post(f"{url}/v1/generate", json={"image": img, "task": task, "lang": row["lang"],
                                                              "prompt": prompt}, timeout=60)
                samples.append({"task": task, "lang": row["lang"], "status": r.status_code,
                                "latency_s": time.time() - t, "text": r.json().get("text") if r.ok else r.text,
                                "reference": ref})
        res["samples"] = samples
        res["sample_exact_match"] = sum(s["text"] == s["reference"] for s in samples) / len(samples)
        res["stats_before_burst"] = requests.get(f"{url}/v1/stats", timeout=10).json()
        imgs = [_example(100 + i) for i in range(burst)]

        def one(k: int) -> tuple[int, float, int]:
            img, row = imgs[k]
            t = time.time()
            r = requests.post(f"{url}/v1/generate", json={"image": img, "task": "caption", "lang": row["lang"]},
                              timeout=120)
            return r.status_code, time.time() - t, int(r.headers.get("x-pali-batch-size", 0))

        t = time.time()
        with ThreadPoolExecutor(burst) as ex:
            got = list(ex.map(one, range(burst)))
        wall = time.time() - t
        lat = sorted(g[1] for g in got)
        res["burst"] = {"requests": burst, "ok": sum(g[0] == 200 for g in got), "wall_s": wall,
                        "requests_per_s": burst / wall, "p50_s": lat[len(lat) // 2],
                        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                        "max_batch_seen": max(g[2] for g in got)}
        bad = requests.post(f"{url}/v1/generate", json={"image": "not base64!", "task": "caption"}, timeout=30)
        res["bad_request_status"] = bad.status_code
        res["stats"] = requests.get(f"{url}/v1/stats", timeout=10).json()
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        log.close()
        res["serve_log_tail"] = _tail((out / "serve.log").read_text(errors="replace"), 15)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pali.bench.gpu_ray_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--workers", type=int, default=1, help="training workers (one GPU each)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--burst", type=int, default=64, help="concurrent requests in the batching burst")
    p.add_argument("--cpu", action="store_true", help="no --use-gpu (smoke run without a GPU)")
    p.add_argument("--train-timeout", type=float, default=420)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"train": train(out, a.steps, a.workers, a.cpu, a.train_timeout)}
    if res["train"].get("checkpoint"):
        res["serve"] = serve_and_query(res["train"]["checkpoint"], out, a.port, a.burst, timeout=180)
    (out / "gpu_ray.json").write_text(json.dumps(res, indent=2, default=str))
    t, s = res["train"], res.get("serve", {})
    print(json.dumps({"train": {k: t.get(k) for k in ("returncode", "seconds", "first_loss", "last_record",
                                                        "heldout", "eval", "stderr_tail")},
                      "serve": {k: s.get(k) for k in ("startup_s", "sample_exact_match", "burst",
                                                      "bad_request_status", "stats", "error")},
                      "samples": s.get("samples", [])[:9]}, indent=1, default=str, ensure_ascii=False))
    ok = t.get("returncode") == 0 and "error" not in s and s.get("burst", {}).get("ok") == a.burst
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
