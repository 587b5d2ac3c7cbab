"""CLI of the local multi-node cluster (`python -m cluster.local_cluster`).

    python -m cluster.local_cluster [--dir DIR] up|status|add-node|remove-node|down
"""

from __future__ import annotations

import argparse
import os
import sys

from cluster.local_cluster import DEFAULT_DIR, LocalCluster


def print_status(cluster: LocalCluster) -> None:
    """Print the cluster's address and one line per node (pid, process and GCS liveness, resources)."""
    print(f"address:   {cluster.address}")
    print(f"dashboard: {cluster.dashboard_url or '-'}")
    print(f"dir:       {cluster.dir}")
    print(f"{'name':<10} {'pid':>7} {'running':<8} {'alive':<6} {'node_id':<14} resources")
    table = {row["name"]: row for row in cluster.node_table() if row["alive"]}
    for node in cluster.nodes:
        row = table.get(node.name, {})
        res = {k: v for k, v in row.get("resources", {}).items() if k != "memory"}
        print(f"{node.name:<10} {node.pid:>7} {str(node.is_running()):<8} {str(bool(row)):<6} "
              f"{row.get('node_id', '-')[:12]:<14} {res}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m cluster.local_cluster`."""
    parser = argparse.ArgumentParser(prog="python -m cluster.local_cluster",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=os.environ.get("PALI_LOCAL_CLUSTER_DIR", DEFAULT_DIR),
                        help=f"cluster directory (default {DEFAULT_DIR}, or $PALI_LOCAL_CLUSTER_DIR)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a head and worker nodes, then return (they keep running)")
    up.add_argument("--workers", type=int, default=2, help="worker nodes besides the head (default 2)")
    up.add_argument("--cpus-per-node", type=int, default=4, help="logical CPUs per worker node (default 4)")
    up.add_argument("--head-cpus", type=int, default=None, help="logical CPUs of the head (default: same)")
    up.add_argument("--dashboard", action="store_true", help="start the dashboard and job server")
    up.add_argument("--object-store-mb", type=int, default=100, help="object store per node in MiB")
    up.add_argument("--no-ray-auth", action="store_true",
                    help="turn Ray's token authentication off (warned; anyone reaching this machine can run code)")
    sub.add_parser("status", help="list the nodes and what the GCS says about them")
    sub.add_parser("down", help="stop every node of the cluster and remove its directory")
    add = sub.add_parser("add-node", help="start one more worker node")
    add.add_argument("--cpus", type=int, default=None, help="logical CPUs (default: --cpus-per-node of up)")
    rm = sub.add_parser("remove-node", help="stop one worker node")
    rm.add_argument("name", help="node name, e.g. worker-1")
    rm.add_argument("--kill", action="store_true", help="SIGKILL (simulate a crash) instead of SIGTERM")
    args = parser.parse_args(argv)

    if args.cmd == "up":
        cluster = LocalCluster(args.workers, args.cpus_per_node, head_cpus=args.head_cpus,
                               include_dashboard=args.dashboard, object_store_mb=args.object_store_mb,
                               dir=args.dir, keep_dir=True, auth=not args.no_ray_auth)
        cluster.start()
        cluster.detach()
        print_status(cluster)
        mode = f"RAY_AUTH_MODE={cluster.auth_env.get('RAY_AUTH_MODE', 'token')}"
        print(f"\nconnect: {mode} RAY_ADDRESS={cluster.address} python your_driver.py")
        if cluster.dashboard_url:
            print(f"submit:  {mode} ray job submit --address {cluster.dashboard_url} --working-dir . -- python ...")
        if mode.endswith("token"):
            print("token:   Ray's own lookup (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); "
                  "`ray get-auth-token` prints it")
        return 0
    cluster = LocalCluster.attach(args.dir)
    if args.cmd == "status":
        print_status(cluster)
    elif args.cmd == "down":
        cluster.shutdown()
        print(f"stopped; removed {args.dir}")
    elif args.cmd == "add-node":
        default_cpus = (cluster.workers or [cluster.head])[-1].num_cpus
        node = cluster.add_node(num_cpus=args.cpus if args.cpus is not None else default_cpus)
        print(f"added {node.name} (pid {node.pid})")
    elif args.cmd == "remove-node":
        # A killed node is noticed by the GCS only after its health-check timeout: do not wait.
        node = cluster.remove_node(args.name, graceful=not args.kill, wait_s=0 if args.kill else 30)
        print(f"removed {node.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
