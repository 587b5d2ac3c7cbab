"""KubeRay manifests: a structural check (no Kubernetes API server or CRD schema is available here).

Checked: the files parse as YAML; apiVersion/kind; the RayCluster spec shape KubeRay requires
(headGroupSpec and workerGroupSpecs with pod templates and containers); autoscaling is on with
sane replica bounds; GPU limits on the worker containers agree with `num-gpus`; every Ray container
mounts the shared volume backed by the PVC; the RayJob embeds exactly the RayCluster spec and runs
`python -m jobs.pretrain --preset pali-3b` with arguments the real pretrain CLI parses and validates.
Not checked: the full CRD OpenAPI schema, that images exist, that the storage class exists.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _raycluster() -> dict:
    (doc,) = [d for d in _docs("raycluster.yaml") if d["kind"] == "RayCluster"]
    return doc


def _rayjob() -> dict:
    (doc,) = _docs("rayjob.yaml")
    return doc


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["rayVersion"]), spec["rayVersion"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    (head_container,) = _containers(head)
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    ports = {p["containerPort"] for p in head_container["ports"]}
    assert {6379, 8265} <= ports, ports
    groups = spec["workerGroupSpecs"]
    assert groups, "expected a worker group"
    gpu_groups = [g for g in groups if any("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(g))]
    assert gpu_groups, "expected a GPU worker group"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] >= 1
        (container,) = _containers(group)
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert isinstance(gpus, int) and gpus > 0
        assert int(group["rayStartParams"].get("num-gpus", gpus)) == gpus
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    images = {c["image"] for g in [head, *groups] for c in _containers(g)}
    assert len(images) == 1, f"head and workers should share one image, got {images}"
    for group in [head, *groups]:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        for container in _containers(group):
            assert container["resources"]["limits"]["cpu"] and container["resources"]["limits"]["memory"]
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert mounts.get("shared") == "/mnt/shared", f"{container['name']} lacks the shared mount"
            assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "pali-shared"


def test_raycluster_structure():
    docs = _docs("raycluster.yaml")
    pvc = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc and pvc[0]["metadata"]["name"] == "pali-shared"
    assert "ReadWriteMany" in pvc[0]["spec"]["accessModes"], "checkpoints need storage every pod can write"
    cluster = _raycluster()
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["name"]
    _check_cluster_spec(cluster["spec"])


def test_rayjob_structure_and_cluster_spec_in_sync():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    yaml.safe_load(spec["runtimeEnvYAML"])  # a YAML string inside the manifest
    _check_cluster_spec(spec["rayClusterSpec"])
    assert spec["rayClusterSpec"] == _raycluster()["spec"], "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"


def test_rayjob_entrypoint_fits_the_cluster():
    """The entrypoint parses with the real pretrain CLI (flags, values, TrainConfig.validate) and its
    layout fits the worker group at every elastic size."""
    pretrain = pytest.importorskip("jobs.pretrain")
    from pali.config import get_preset

    args = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert args[:3] == ["python", "-m", "jobs.pretrain"]
    cfg, _ = pretrain.parse_args(args[3:])
    assert cfg.preset == "pali-3b" and get_preset(cfg.preset).name == "pali-3b"
    assert cfg.use_gpu
    mp = cfg.tp * cfg.pp
    assert cfg.min_workers % mp == 0 and cfg.max_workers % mp == 0, "world size must be a multiple of TP x PP"
    (gpu_group,) = _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus_per_pod = _containers(gpu_group)[0]["resources"]["limits"]["nvidia.com/gpu"]
    assert cfg.max_workers <= gpu_group["maxReplicas"] * gpus_per_pod, "more workers than the group's GPUs"
    for dp in range(cfg.min_workers // mp, cfg.max_workers // mp + 1):
        assert cfg.global_batch % dp == 0, f"global batch {cfg.global_batch} does not split over dp={dp}"
    assert cfg.storage_path.startswith(("/mnt/shared", "s3://", "gs://")), "checkpoints need shared storage"
