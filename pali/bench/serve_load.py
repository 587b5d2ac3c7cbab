"""Load test of the Serve application: requests/s and p50/p99 latency with batching on and off.

    python -m pali.bench.serve_load [--checkpoint CKPT] [--concurrency 32] [--duration 20] [--rounds 2]
                                    [--ingress proxy|haproxy] [--out result.json]

Without `--checkpoint` a tiny random model is made in a temp dir. Serves on 127.0.0.1 only, one replica;
the two modes differ only in `max_batch_size` (16 vs 1) and face the same load: the same pre-encoded
request bodies, sent by `concurrency` closed-loop clients. Modes alternate within one Ray session
(on off, off on, ...: `--rounds`), so load from other work on the machine hits both alike. `--ingress`
picks Serve's HTTP ingress for the Ray session it starts (`serve.config.INGRESS_ENV`): Serve's Python
proxy (default) or HAProxy with direct ingress into the replica.

The load generator is one asyncio process (aiohttp, keep-alive connections, bodies encoded once) so
that it costs little CPU next to the server it measures. Every mode also records the CPU time that the
load generator, the Serve HTTP proxy, the replica and the rest of Ray spent per request (from
/proc), and how busy the whole machine was: on a small shared machine these decide the ratio.
Prints and writes JSON that records hardware, commit and date next to the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from serve.config import INGRESS_ENV, AppArgs, ingress_env  # pydantic only: Ray is imported in main

MODES = {"batching_on": None, "batching_off": 1}
"""Mode name -> max_batch_size (None: the `--max-batch-size` flag)."""


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


def request_bodies(n: int, max_new_tokens: int) -> list[bytes]:
    """`n` JSON bodies of `POST /v1/generate` (caption task, 4 languages), encoded once up front."""
    return [json.dumps({"image": image_b64(i), "task": "caption", "lang": ["en", "fr", "zh", "ar"][i % 4],
                        "max_new_tokens": max_new_tokens}).encode() for i in range(n)]


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


# --- CPU accounting from /proc (Linux; empty elsewhere) -------------------------------------------------
def _proc_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command line, CPU seconds used so far) of every process we may read."""
    tck = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ... utime stime at 11, 12
        out[int(d.name)] = (int(fields[1]), cmd, (int(fields[11]) + int(fields[12])) / tck)
    return out


def _group(cmd: str) -> str:
    if cmd.startswith("ray::ServeReplica"):
        return "replica"
    if cmd.startswith(("ray::ProxyActor", "ray::HAProxyManager")) or "/haproxy " in cmd:
        return "proxy"  # the HTTP ingress: Serve's proxy actor, or HAProxy and the actor that manages it
    return "ray_other"


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds used so far by this process (the load generator), by its descendants grouped as
    replica / proxy / ray_other, and by the whole machine (`machine_busy`, all cores)."""
    snap = {"load_generator": 0.0, "replica": 0.0, "proxy": 0.0, "ray_other": 0.0, "machine_busy": 0.0}
    try:
        table = _proc_table()
        cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return {}
    snap["machine_busy"] = (sum(cpu) - cpu[3] - cpu[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    snap["load_generator"] = table.get(os.getpid(), (0, "", 0.0))[2]
    for pid in _descendants(table):
        snap[_group(table[pid][1])] += table[pid][2]
    return snap


def _descendants(table: dict[int, tuple[int, str, float]]) -> list[int]:
    """Pids of this process's children, their children, and so on, from a `_proc_table`."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = [], list(children.get(os.getpid(), []))
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _descendant_commands() -> list[tuple[int, str]]:
    """(pid, command line) of this process's descendants; empty where /proc cannot be read."""
    try:
        table = _proc_table()
    except OSError:
        return []
    return [(pid, table[pid][1]) for pid in _descendants(table)]


def ingress_processes() -> list[str]:
    """Names of this process's descendants that serve as the HTTP ingress (see `_group`)."""
    cmds = (cmd for _, cmd in _descendant_commands())
    return sorted({cmd.split()[0].rsplit("/", 1)[-1] for cmd in cmds if _group(cmd) == "proxy"})


def _listen_addresses() -> dict[int, str]:
    """Socket inode -> `ip:port` of every listening TCP socket on this machine (from /proc/net)."""
    out: dict[int, str] = {}
    for name in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = f[1].split(":")
            raw = bytes.fromhex(hex_ip)
            if len(raw) == 4:
                ip = ".".join(str(b) for b in raw[::-1])
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                ip = "[" + socket.inet_ntop(socket.AF_INET6, words) + "]"
            out[int(f[9])] = f"{ip}:{int(hex_port, 16)}"
    return out


def ingress_listeners() -> list[str]:
    """`ip:port` of every TCP socket that an HAProxy process among this process's descendants listens on."""
    listening = _listen_addresses()
    found = set()
    for pid, cmd in _descendant_commands():
        if "/haproxy " not in cmd:
            continue
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and int(link[8:-1]) in listening:
                found.add(listening[int(link[8:-1])])
    return sorted(found)


def cpu_per_request(before: dict, after: dict, wall: float, requests: int) -> dict:
    """CPU milliseconds per request of each process group, and busy cores (ours and the machine's)."""
    if not before or not after or not requests:
        return {}
    d = {k: after[k] - before[k] for k in before}
    ours = d["load_generator"] + d["replica"] + d["proxy"] + d["ray_other"]
    out = {f"{k}_ms_per_request": round(1000 * d[k] / requests, 2)
           for k in ("load_generator", "proxy", "replica", "ray_other")}
    out.update(ours_ms_per_request=round(1000 * ours / requests, 2), ours_busy_cores=round(ours / wall, 2),
               machine_busy_cores=round(d["machine_busy"] / wall, 2),
               others_busy_cores=round(max(0.0, d["machine_busy"] - ours) / wall, 2))
    return out


# --- load --------------------------------------------------------------------------------------------
async def _load(url: str, bodies: list[bytes], concurrency: int, duration: float) -> dict:
    import aiohttp

    lat: list[float] = []
    done_in_window = [0]
    errors: dict[int, int] = {}
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        start = time.perf_counter()
        stop = start + duration

        async def client(k: int) -> None:
            i = k
            while (t := time.perf_counter()) < stop:
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as r:
                    await r.read()
                    status = r.status
                end = time.perf_counter()
                if status == 200:
                    lat.append(end - t)
                    done_in_window[0] += end <= stop
                else:
                    errors[status] = errors.get(status, 0) + 1
                i += concurrency

        await asyncio.gather(*(client(k) for k in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "errors": sum(errors.values()), "error_statuses": errors,
            "wall_s": round(wall, 2), "requests_per_s": round(done_in_window[0] / duration, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None}


def run_load(url: str, concurrency: int, duration: float, max_new_tokens: int,
             bodies: list[bytes] | None = None) -> dict:
    """`concurrency` closed-loop clients for `duration` seconds against `url`/v1/generate: throughput
    (requests completed inside the window / duration), latency percentiles (every completed request)
    and the CPU each process group spent per request."""
    bodies = bodies or request_bodies(64, max_new_tokens)
    before = cpu_snapshot()
    res = asyncio.run(_load(url + "/v1/generate", bodies, concurrency, duration))
    res["cpu"] = cpu_per_request(before, cpu_snapshot(), res["wall_s"], res["requests"])
    return res


def mode_order(rounds: int) -> list[str]:
    """on off, off on, on off, ...: every mode runs first as often as the other (side by side)."""
    names = list(MODES)
    return [m for r in range(rounds) for m in (names if r % 2 == 0 else names[::-1])]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with `--rounds`, `--duration` and `--concurrency` checked."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per mode and round")
    p.add_argument("--rounds", type=int, default=1, help="rounds of both modes, alternating which goes first")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=16, help="batch size of the 'batching on' run")
    p.add_argument("--batch-wait-timeout-s", type=float, default=None,
                   help="batch wait of both modes (default: the app's default, serve.config.AppArgs)")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="Serve's per-replica request cap, both modes (default: max(concurrency, max batch size))")
    p.add_argument("--torch-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--app", default="serve.app:build_app",
                   help="application builder as module:function (e.g. another version of the app to compare)")
    p.add_argument("--ingress", choices=list(INGRESS_ENV), default="proxy",
                   help="Serve's HTTP ingress for this run's Ray session (serve.config.INGRESS_ENV)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.duration <= 0 or a.concurrency < 1:
        p.error(f"--rounds={a.rounds}, --duration={a.duration}, --concurrency={a.concurrency}; expected >= 1, "
                "> 0, >= 1")
    return a


def _select_ingress(ingress: str) -> None:
    """Set the environment that selects `ingress` for the Ray session this process will start."""
    env = ingress_env(ingress)
    if env:
        if "ray.serve" in sys.modules:  # Serve reads these when its modules are imported
            raise RuntimeError(f"--ingress {ingress} needs a fresh process: ray.serve is already imported")
        os.environ.update(env)
        # Deleting a direct-ingress app waits 30 s for load balancers to see it drain; the runs here
        # switch apps between modes with no load in flight.
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")


def _load_builder(spec: str):
    """The application builder named `module:function`."""
    import importlib

    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def _start_serve(torch_threads: int) -> str:
    """Start Ray (token auth on, `torch_threads` OpenMP threads per worker) and Serve on a free local port;
    returns Serve's URL."""
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from cluster.auth import use_in_this_process

    use_in_this_process()
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(torch_threads)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def _batch_sizes(url: str) -> dict:
    """The replica's counts of the batch sizes it has run so far (`/v1/stats`)."""
    import requests

    return requests.get(url + "/v1/stats", timeout=30).json()["batch_sizes"]


def _run_mode(a: argparse.Namespace, mode: str, build_app, ckpt: str, wait: float, url: str,
              bodies: list[bytes]) -> dict:
    """Deploy the app in `mode`, warm it up and load it; the run's record (leaves the app deployed)."""
    from ray import serve

    mbs = MODES[mode] or a.max_batch_size
    app = build_app({"models": {"default": ckpt}, "num_replicas": 1, "max_batch_size": mbs,
                     "max_ongoing_requests": a.max_ongoing_requests or max(a.concurrency, a.max_batch_size),
                     "num_cpus": 0.5,
                     "torch_threads": a.torch_threads, "batch_wait_timeout_s": wait})
    serve.run(app, name="bench", route_prefix="/")
    run_load(url, min(a.concurrency, 4), 2.0, a.max_new_tokens, bodies)  # warm-up
    stats0 = _batch_sizes(url)
    load = [round(x, 2) for x in os.getloadavg()]
    res = {"mode": mode, "max_batch_size": mbs, "load_avg_at_start": load,
           **run_load(url, a.concurrency, a.duration, a.max_new_tokens, bodies)}
    stats1 = _batch_sizes(url)
    res["batch_sizes"] = {k: v - stats0.get(k, 0) for k, v in stats1.items() if v - stats0.get(k, 0)}
    res["ingress_processes"] = ingress_processes()
    res["ingress_listeners"] = ingress_listeners()
    return res


def _print_run(res: dict) -> None:
    """One line per run: throughput, latency, errors, load and CPU per request."""
    mode, mbs, load, cpu = res["mode"], res["max_batch_size"], res["load_avg_at_start"], res["cpu"]
    print(f"{mode:13s} max_batch_size={mbs:3d}  {res['requests_per_s']:8.2f} req/s  p50 {res['p50_ms']} ms  "
          f"p99 {res['p99_ms']} ms  errors {res['errors']}  load {load[0]}  CPU ms/request: "
          f"gen {cpu.get('load_generator_ms_per_request')} proxy {cpu.get('proxy_ms_per_request')} "
          f"replica {cpu.get('replica_ms_per_request')}  machine busy {cpu.get('machine_busy_cores')} "
          f"cores", flush=True)


def _median_results(runs: list[dict]) -> dict:
    """Per mode: median requests/s, p50 and p99 over its runs, and the errors summed."""
    results = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        results[mode] = {k: float(np.median([r[k] for r in mine if r[k] is not None] or [np.nan]))
                         for k in ("requests_per_s", "p50_ms", "p99_ms")}
        results[mode]["errors"] = sum(r["errors"] for r in mine)
    return results


def _record(a: argparse.Namespace, wait: float, runs: list[dict]) -> dict:
    """The JSON record: provenance, settings, medians, on/off ratios of each round, and every run."""
    results = _median_results(runs)
    pairs = list(zip(runs[0::2], runs[1::2], strict=True))
    on_off = [(x, y) if x["mode"] == "batching_on" else (y, x) for x, y in pairs]
    return {"benchmark": "serve_load", "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": commit(), "hardware": hardware(), "checkpoint": a.checkpoint or "random tiny preset",
            "app": a.app, "ingress": a.ingress,
            "concurrency": a.concurrency, "duration_s": a.duration, "rounds": a.rounds,
            "max_new_tokens": a.max_new_tokens, "batch_wait_timeout_s": wait, "results": results,
            "throughput_ratios": [round(on["requests_per_s"] / off["requests_per_s"], 3) for on, off in on_off],
            "p99_ratios": [round(on["p99_ms"] / off["p99_ms"], 3) for on, off in on_off], "runs": runs}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print and write the results."""
    a = _parse_args(argv)
    _select_ingress(a.ingress)
    import ray
    from ray import serve

    build_app = _load_builder(a.app)
    wait = a.batch_wait_timeout_s if a.batch_wait_timeout_s is not None else \
        AppArgs.model_fields["batch_wait_timeout_s"].default
    tmp = tempfile.TemporaryDirectory()
    ckpt = a.checkpoint or str(tiny_checkpoint(Path(tmp.name) / "tiny"))
    bodies = request_bodies(64, a.max_new_tokens)
    url = _start_serve(a.torch_threads)
    runs: list[dict] = []
    try:
        for mode in mode_order(a.rounds):
            res = _run_mode(a, mode, build_app, ckpt, wait, url, bodies)
            runs.append(res)
            _print_run(res)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    out = _record(a, wait, runs)
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
