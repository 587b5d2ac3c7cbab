"""Fixtures for training tests: a small generated corpus shared by the module's runs."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """Four parquet shards of 64 synthetic examples (train) and one (held-out)."""
    from pali.data.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("train-data")
    write_synthetic_shards(str(root / "train"), num_examples=256, seed=0, examples_per_shard=64)
    write_synthetic_shards(str(root / "val"), num_examples=64, seed=1, examples_per_shard=64)
    return root


BUCKET = "pali-test"
"""The bucket the `s3` fixture creates."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A bucket and the standard AWS variables pointing at the loopback server: `.client` (boto3),
    `.bucket` and `.url` (s3://bucket)."""
    import boto3

    for k, v in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3_server)
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    return SimpleNamespace(client=client, bucket=BUCKET, url=f"s3://{BUCKET}")
