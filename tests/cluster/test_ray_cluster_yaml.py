"""`ray-cluster.yaml` against Ray's own schema and config validation, offline.

What is validated (and what is not):
1. the raw file against `ray/autoscaler/ray-schema.json` shipped in the installed ray package;
2. `prepare_config` (merges the AWS provider defaults, the setup commands, docker and per-type
   min/max workers; it only reads files) followed by `validate_config` (the schema again plus
   Ray's semantic checks: head type exists, sum of min_workers <= max_workers, ...). These are the
   steps `ray up` runs before it talks to AWS; a socket guard proves no network call is made;
3. every node type's `node_config` against botocore's EC2 `RunInstances` request model (what Ray
   passes to `ec2.create_instances`), which catches misspelt instance fields;
4. project rules: every node type declares `resources`, a GPU worker type scales between
   min and max, torch is installed before the package, the package dir is synced.
Not validated: that the AMI/instance types/zones exist in an account (needs AWS).
"""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "ray-cluster.yaml"


def _load() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture
def no_network(monkeypatch):
    """Make any outgoing connection fail loudly (validation must stay offline)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during config validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_raw_config_matches_ray_schema():
    jsonschema.validate(_load(), _schema())


def test_prepare_and_validate_config_offline(no_network):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_load()))
    validate_config(prepared)
    # prepare_config merged the setup commands and filled per-type limits; check what `ray up` will run.
    assert prepared["head_node_type"] == "ray.head.cpu"
    assert prepared["available_node_types"]["ray.head.cpu"]["max_workers"] == 0
    assert any("pip install" in c and "-e ~/pali-ray" in c for c in prepared["worker_setup_commands"])


def test_every_node_type_declares_resources():
    cfg = _load()
    for name, node_type in cfg["available_node_types"].items():
        assert "resources" in node_type, f"node type {name} has no resources key"
        assert node_type["resources"].get("CPU", 0) > 0, f"node type {name} declares no CPUs"


def test_gpu_worker_type_autoscales():
    cfg = _load()
    head = cfg["head_node_type"]
    assert cfg["available_node_types"][head]["resources"].get("GPU", 0) == 0, "GPU work belongs on workers"
    gpu_types = {n: t for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "expected at least one GPU worker node type"
    for name, t in gpu_types.items():
        assert 0 <= t["min_workers"] < t["max_workers"] <= cfg["max_workers"], name
    assert sum(t.get("min_workers", 0) for t in cfg["available_node_types"].values()) <= cfg["max_workers"]


def test_setup_installs_torch_before_the_package():
    cfg = _load()
    lists = {"head_setup_commands": cfg["head_setup_commands"], "worker_setup_commands": cfg["worker_setup_commands"]}
    for name, t in cfg["available_node_types"].items():
        if "worker_setup_commands" in t:
            lists[f"{name}.worker_setup_commands"] = t["worker_setup_commands"]
    for where, cmds in lists.items():
        cmds = cfg["setup_commands"] + cmds
        torch_at = [i for i, c in enumerate(cmds) if "pip install" in c and " torch" in c]
        pkg_at = [i for i, c in enumerate(cmds) if "pip install" in c and "-e ~/pali-ray" in c]
        assert torch_at and pkg_at and torch_at[0] < pkg_at[0], f"{where}: {cmds}"
    # The package directory that pip installs is the one the repository is synced to.
    assert cfg["file_mounts"].get("~/pali-ray") == "."
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert any("ray start" in c and "RAY_AUTH_MODE=token" in c for c in cmds)
    assert any("--head" in c and "--autoscaling-config=~/ray_bootstrap_config.yaml" in c
               for c in cfg["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])


def test_node_configs_match_ec2_run_instances_model():
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    shape = botocore_session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, t in _load()["available_node_types"].items():
        # Ray adds ImageId (its default AMI), MinCount/MaxCount and tags before calling create_instances.
        params = {"ImageId": "ami-0123456789abcdef0", "MinCount": 1, "MaxCount": 1, **t["node_config"]}
        report = ParamValidator().validate(params, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"


@pytest.mark.parametrize("breakage", ["drop_resources", "unknown_field", "fractional_gpu", "bad_head_type"])
def test_validation_rejects_broken_configs(breakage, no_network):
    """The checks above can fail: Ray's own validation rejects each of these edits."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load()
    if breakage == "drop_resources":
        del cfg["available_node_types"]["ray.worker.h100"]["resources"]
    elif breakage == "unknown_field":
        cfg["available_node_types"]["ray.worker.h100"]["max_wokers"] = 4
    elif breakage == "fractional_gpu":
        cfg["available_node_types"]["ray.worker.h100"]["resources"]["GPU"] = 0.5
    else:
        cfg["head_node_type"] = "ray.head.missing"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(cfg))

