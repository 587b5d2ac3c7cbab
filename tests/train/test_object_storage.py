"""The whole run on object storage: a real S3-compatible server (moto's server mode) on loopback.

make shards -> pretrain (a worker killed, the group restarted from the checkpoint on S3) -> the serving
checkpoint written to S3 tensor by tensor -> evaluate and load it back from S3. Every path the user
gives is an `s3://` URI; nothing is mocked in the client (pyarrow's and boto3's own S3 clients talk HTTP).
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow

def _keys(s3, prefix: str) -> list[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_shards_train_fault_consolidate_evaluate_all_on_s3(ray_cluster, s3, tmp_path, monkeypatch, capsys):
    import jobs.evaluate
    import jobs.make_shards
    import jobs.pretrain
    import pali
    from pali.train.metrics import read_metrics

    base = s3.url
    monkeypatch.setenv("PALI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # a URI mistaken for a local path would show up here as ./s3:
    jobs.make_shards.main(["--out", f"{base}/data/train", "--examples", "128", "--examples-per-shard", "64",
                           "--langs", "en", "fr", "--seed", "0"])
    jobs.make_shards.main(["--out", f"{base}/data/val", "--examples", "32", "--examples-per-shard", "32",
                           "--langs", "en", "fr", "--seed", "1"])
    assert len([k for k in _keys(s3, "data/train/") if k.endswith(".parquet")]) == 2

    # Rank 1 dies before step 3 (once: the marker is local); the group restarts from the step-2 checkpoint.
    monkeypatch.setenv("PALI_STEP_HOOKS", "pali.testing.faults:exit_once")
    monkeypatch.setenv("PALI_FAULT_STEP", "3")
    monkeypatch.setenv("PALI_FAULT_MARKER", str(tmp_path / "fault-marker"))
    rc = jobs.pretrain.main(["--data", f"{base}/data/train", "--eval-data", f"{base}/data/val",
                             "--output-dir", f"{base}/run", "--name", "s3run", "--steps", "4",
                             "--checkpoint-every", "2", "--log-every", "1", "--global-batch", "8",
                             "--micro-batch", "4", "--warmup-steps", "2", "--workers", "2",
                             "--vision-pretrain-steps", "0", "--max-failures", "2", "--no-eval"])
    assert rc == 0
    assert (tmp_path / "fault-marker").exists(), "the failure was not injected"
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "runs").exists()

    keys = set(_keys(s3, "run/"))
    for name in ("final/config.json", "final/model.safetensors", "final/tokenizer.model", "metrics.jsonl",
                 "summary.json", "tokenizer.model", "loss_curves.png"):
        assert f"run/{name}" in keys, f"{name} did not reach the bucket ({sorted(keys)[:20]})"
    assert any(k.startswith("run/tensorboard/") for k in keys)
    assert any(k.startswith("run/ray/s3run/checkpoint_") for k in keys)  # Ray Train's checkpoints
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(s3.client.get_object(Bucket=s3.bucket, Key="run/metrics.jsonl")["Body"].read())
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4]
    summary = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="run/summary.json")["Body"].read())
    assert summary["checkpoint"] == f"{base}/run/final" and summary["final_metrics"]["step"] == 4

    # The serving checkpoint on S3 loads (from a cached copy) and generates; jobs.evaluate reads it and
    # the shards from S3.
    model, tok = pali.load_pretrained(f"{base}/run/final")
    assert model.cfg.vision.image_size > 0 and tok.vocab_size <= model.cfg.text.vocab_size
    from pali.models.generate import generate

    size = model.cfg.vision.image_size
    out = generate(model, torch.zeros(1, 3, size, size), torch.tensor([tok.encode("Caption in en:") + [1]]),
                   max_new_tokens=3)
    assert out.shape[0] == 1
    assert jobs.evaluate.main(["--checkpoint", f"{base}/run/final", "--data", f"{base}/data/val",
                               "--out", str(tmp_path / "eval"), "--batch-size", "16"]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["overall"], report
