"""Fixtures of the serving tests: tiny checkpoints and one running Serve application."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_testlib import free_port, make_checkpoint, wait_http


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny serving checkpoints: "tiny" and "tiny-b" (other weights), "broken" (corrupt weights file),
    "naflex" (a SigLIP 2 NaFlex tower: images keep their aspect ratio)."""
    import shutil

    from pali.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("serve_ckpt")
    a = make_checkpoint(root / "tiny", seed=0)
    b = make_checkpoint(root / "tiny-b", seed=1, tok=Tokenizer.load(a / "tokenizer.model"))
    broken = root / "broken"
    shutil.copytree(a, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    nf = make_checkpoint(root / "naflex", seed=2, tok=Tokenizer.load(a / "tokenizer.model"),
                         vision__naflex=True, vision__layout="siglip2", vision__max_num_patches=18)
    return {"tiny": str(a), "tiny-b": str(b), "broken": str(broken), "naflex": str(nf)}


@pytest.fixture(scope="session")
def serve_url(ray_cluster, checkpoints):
    """Base URL of the PaLI application (one replica, batching on) served on 127.0.0.1.

    Serve (controller, proxy, replicas and their CPU reservations) is shut down right after the last
    test of this directory (`pytest_runtest_teardown` below), before other tests use the shared cluster.
    """
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"models": checkpoints, "default_model": "tiny", "num_replicas": 1, "max_batch_size": 16,
                     "batch_wait_timeout_s": 0.05, "max_ongoing_requests": 80, "max_models_per_replica": 1,
                     "num_cpus": 0.5, "max_image_pixels": 512 * 512, "max_body_bytes": 256 * 1024})
    serve.run(app, name="pali", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", timeout=180)
    _SERVE["running"] = True
    yield url
    _shutdown_serve()


_SERVE = {"running": False}
HERE = Path(__file__).resolve().parent


def _shutdown_serve() -> None:
    if _SERVE["running"]:
        from ray import serve

        serve.shutdown()
        _SERVE["running"] = False


def pytest_runtest_teardown(item, nextitem):
    """Shut Serve down once the next test is outside tests/serve (or there is none)."""
    if nextitem is None or HERE not in Path(nextitem.path).resolve().parents:
        _shutdown_serve()
