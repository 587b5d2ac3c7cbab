"""Serve a checkpoint on this machine: `python -m serve --checkpoint CKPT [--port 8000]`.

Starts (or joins, with `--address`) a Ray cluster, runs the Serve application on 127.0.0.1 and blocks
until Ctrl-C. For clusters use `serve run serve/config.yaml` / `serve deploy serve/config.yaml`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from serve.config import INGRESS_ENV, AppArgs, AutoscalingArgs, ingress_env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="serving checkpoint directory (the default model)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="another checkpoint under a name (repeatable); the default is named by --name")
    p.add_argument("--name", default="default", help="name of --checkpoint in the API (default: default)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    p.add_argument("--no-ray-auth", action="store_true",
                   help="start the local Ray without token authentication (warned: its ports listen on every "
                        "interface); a cluster joined with --address keeps its own settings")
    p.add_argument("--max-batch-size", type=int, default=16, help="1 turns batching off")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.1,
                   help="how long a partial batch waits for more requests (default 0.1)")
    p.add_argument("--batching", choices=["iteration", "whole_call"], default="iteration",
                   help="iteration: requests join the running batch between decoding steps (default); whole_call: "
                        "@serve.batch groups decoded to completion (the previous engine)")
    p.add_argument("--max-queued-requests", type=int, default=64,
                   help="waiting requests per loaded model before a 503 with Retry-After (default 64)")
    p.add_argument("--num-replicas", type=int, default=None, help="fixed replicas (default: autoscale)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--num-cpus", type=float, default=0.5, help="logical CPUs reserved per replica")
    p.add_argument("--torch-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--ingress", choices=sorted(INGRESS_ENV), default="proxy",
                   help="HTTP ingress of the local cluster this command starts: proxy (Serve's Python proxy, the "
                        "default) or haproxy (Ray Serve's throughput-optimised HAProxy + direct ingress; 2-2.7x "
                        "the batched requests/s on 2 cores). A cluster joined with --address keeps its own.")
    ns = p.parse_args(argv)
    if ns.address and ns.ingress != "proxy":
        p.error(f"--ingress {ns.ingress} with --address: a running cluster's ingress is fixed when its nodes "
                f"start; start them with {' '.join(f'{k}={v}' for k, v in INGRESS_ENV[ns.ingress].items())}")
    return ns


def app_args(ns: argparse.Namespace) -> AppArgs:
    """`AppArgs` from parsed flags."""
    models = {ns.name: _where(ns.checkpoint)}
    for spec in ns.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model {spec!r}: expected NAME=DIR")
        models[name] = _where(path)
    mbs = ns.max_batch_size
    target = max(mbs, 2)
    return AppArgs(models=models, default_model=ns.name, max_batch_size=mbs,
                   batch_wait_timeout_s=ns.batch_wait_timeout_s, max_ongoing_requests=int(target * 1.5),
                   batching=ns.batching, max_queued_requests=ns.max_queued_requests, num_replicas=ns.num_replicas,
                   num_cpus=ns.num_cpus, torch_threads=ns.torch_threads,
                   autoscaling=AutoscalingArgs(min_replicas=ns.min_replicas, max_replicas=ns.max_replicas,
                                               target_ongoing_requests=target))


def _where(path: str) -> str:
    """A checkpoint's location for the replicas: absolute when local, a URI (s3://...) as given."""
    from pali import storage

    return path if storage.is_uri(path) else os.path.abspath(path)


def main(argv: list[str] | None = None) -> int:
    """Run until interrupted."""
    ns = parse_args(argv)
    args = app_args(ns)
    # Read when Ray and Serve modules are imported, here and in every Ray process this command starts.
    os.environ.update(ingress_env(ns.ingress))
    import ray
    from ray import serve

    from serve.app import build_app

    os.environ.setdefault("OMP_NUM_THREADS", str(ns.torch_threads))
    if not ns.address and not os.environ.get("RAY_ADDRESS"):
        from cluster.auth import use_in_this_process

        use_in_this_process(no_auth_flag=ns.no_ray_auth)
    ray.init(address=ns.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(ns.torch_threads)}})
    serve.start(http_options={"host": ns.host, "port": ns.port})
    serve.run(build_app(args), name="pali", route_prefix="/")
    print(f"PaLI serving {sorted(args.models)} at http://{ns.host}:{ns.port}/ (docs at /docs); Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
