"""What a training worker group needs from Ray: its process-group backend, and whether a fixed-size
cluster can ever start it."""

from __future__ import annotations

from pali.train.config import TrainConfig


def torch_backend(use_gpu: bool) -> str:
    """Process-group backend of the workers. On GPUs: nccl for CUDA tensors (gradients, activations, TP/PP
    traffic) and gloo for the CPU-side bookkeeping collectives (metric sums, the data position, the batch
    hand-off within a replica), which nccl alone rejects ("No backend type associated with device type
    cpu"; seen on an H200 before this was mixed)."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def unmet_resources(cfg: TrainConfig, cluster: dict[str, float]) -> str | None:
    """Why a cluster whose resources cannot grow (a local Ray) can never start the smallest worker group
    of `cfg`, or None. Ray Train would otherwise wait for the resources forever."""
    need = cfg.worker_range()[0]
    per = {"CPU": cfg.cpus_per_worker, **cfg.worker_resources, **({"GPU": 1.0} if cfg.use_gpu else {})}
    for name, amount in per.items():
        have = float(cluster.get(name, 0.0))
        if need * amount > have + 1e-9:
            fits = int(have // amount) if amount else 0
            hint = {"GPU": f"pass --workers {fits} (a multiple of tp*pp = {cfg.tp * cfg.pp})" if fits else
                    "drop --use-gpu or run on a machine with GPUs",
                    "CPU": "lower --cpus-per-worker or raise --num-cpus"}.get(name, "fix --worker-resources")
            return (f"{need} workers x {amount:g} {name} need {need * amount:g} {name} but this Ray cluster has "
                    f"{have:g}; {hint}")
    return None
