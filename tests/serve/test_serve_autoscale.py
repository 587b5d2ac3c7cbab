"""Autoscaling on the local cluster: replicas grow under sustained load and shrink after it."""

from __future__ import annotations

import base64
import threading
import time

import pytest
import requests
from serve_testlib import png_bytes

pytestmark = pytest.mark.slow


def live_replicas(app: str) -> int:
    """Replicas Serve has started or is starting (not stopping) for the app's deployment."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    states = status.deployments["PaLIServer"].replica_states
    return sum(n for s, n in states.items() if s in ("STARTING", "UPDATING", "RECOVERING", "RUNNING"))


def wait_for(pred, timeout: float, what: str) -> float:
    start = time.time()
    while not pred():
        if time.time() - start > timeout:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.25)
    return time.time() - start


def test_replicas_grow_under_load_and_shrink_after(serve_url, checkpoints):
    from ray import serve

    from serve.app import build_app

    # Tiny delays for the test; the shipped config.yaml uses 10 s up / 300 s down.
    app = build_app({"models": {"tiny": checkpoints["tiny"]}, "max_batch_size": 2, "max_ongoing_requests": 3,
                     "num_cpus": 0.25, "batch_wait_timeout_s": 0.0,
                     "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                     "upscale_delay_s": 0.5, "downscale_delay_s": 2.0,
                                     "metrics_interval_s": 0.25, "look_back_period_s": 1.0}})
    serve.run(app, name="scale", route_prefix="/scale")
    try:
        assert live_replicas("scale") == 1
        stop = threading.Event()
        body = {"image": base64.b64encode(png_bytes(9)).decode(), "task": "caption", "lang": "en",
                "max_new_tokens": 8}
        codes: list[int] = []

        def client():
            while not stop.is_set():
                codes.append(requests.post(serve_url + "/scale/v1/generate", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            up = wait_for(lambda: live_replicas("scale") == 2, 40, "scaling up to 2 replicas")
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert codes and set(codes) <= {200, 503}, set(codes)  # 503 = Serve backpressure, never a 4xx/500
        assert codes.count(200) > len(codes) // 2
        down = wait_for(lambda: live_replicas("scale") == 1, 40, "scaling back down to 1 replica")
        print(f"scaled up after {up:.1f} s of load, down {down:.1f} s after it stopped")
    finally:
        serve.delete("scale")


def test_replica_whose_checkpoint_fails_to_load_is_retried_then_reported(serve_url, checkpoints):
    from ray import serve

    from serve.app import build_app

    app = build_app({"models": {"broken": checkpoints["broken"]}, "num_replicas": 1, "num_cpus": 0.25,
                     "max_constructor_retry_count": 2})
    try:
        with pytest.raises(RuntimeError):
            serve.run(app, name="broken", route_prefix="/broken")
        status = serve.status().applications["broken"]
        assert status.status == "DEPLOY_FAILED"
        message = status.deployments["PaLIServer"].message
        assert f"loading checkpoint {checkpoints['broken']}" in message and "2 times" in message, message
        # the healthy application next to it is untouched
        assert requests.get(serve_url + "/healthz", timeout=30).status_code == 200
    finally:
        serve.delete("broken")
