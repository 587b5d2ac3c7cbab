"""Fixtures of the serving tests: tiny checkpoints, test images and one running Serve application."""

from __future__ import annotations

import io
import socket
import time

import numpy as np
import pytest
from PIL import Image

SENTENCES = [
    "a red circle above a blue square", "two green triangles on a white background",
    "un cercle rouge au-dessus d'un carré bleu", "deux triangles verts sur fond blanc",
    "ein roter Kreis über einem blauen Quadrat", "un círculo rojo sobre un cuadrado azul",
    "красный круг над синим квадратом", "دائرة حمراء فوق مربع أزرق", "नीले वर्ग के ऊपर लाल वृत्त",
    "蓝色正方形上方的红色圆圈", "青い四角の上の赤い丸", "파란 사각형 위의 빨간 원", "what colour is the circle?",
]


def make_checkpoint(out_dir, seed: int, tok=None):
    """A tiny random PaLI with a tokenizer trained on a few multilingual sentences."""
    import pali
    from pali.config import get_preset
    from pali.data.prompts import prompt_templates
    from pali.tokenizer import Tokenizer

    if tok is None:
        tok = Tokenizer.train(SENTENCES * 4 + prompt_templates(), vocab_size=1000, seed=0)
    cfg = get_preset("tiny").with_overrides(text__vocab_size=tok.vocab_size)
    model = pali.create_model(cfg, seed=seed)
    return pali.save_pretrained(model, tok, out_dir)


def png_bytes(seed: int, size: int = 48) -> bytes:
    """A deterministic random-coloured test image, PNG-encoded."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, 1, 3))
    noise = rng.integers(0, 256, size=(size, size, 3))
    arr = ((base + noise * (seed % 3 + 1) // 3) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_header_bomb(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims `width` x `height` pixels (a decompression-bomb header)."""
    import struct
    import zlib

    data = bytearray(png_bytes(0, size=1))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny serving checkpoints: "tiny" and "tiny-b" (other weights), "broken" (corrupt weights file)."""
    import shutil

    from pali.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("serve_ckpt")
    a = make_checkpoint(root / "tiny", seed=0)
    b = make_checkpoint(root / "tiny-b", seed=1, tok=Tokenizer.load(a / "tokenizer.model"))
    broken = root / "broken"
    shutil.copytree(a, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    return {"tiny": str(a), "tiny-b": str(b), "broken": str(broken)}


def wait_http(url: str, timeout: float = 60.0) -> None:
    """Block until `url` answers 200."""
    import requests

    deadline = time.time() + timeout
    while True:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout} s")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def serve_url(ray_cluster, checkpoints):
    """Base URL of the PaLI application (one replica, batching on) served on 127.0.0.1."""
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"models": checkpoints, "default_model": "tiny", "num_replicas": 1, "max_batch_size": 16,
                     "batch_wait_timeout_s": 0.05, "max_ongoing_requests": 80, "max_models_per_replica": 1,
                     "num_cpus": 0.5, "max_image_pixels": 512 * 512, "max_body_bytes": 256 * 1024})
    serve.run(app, name="pali", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz")
    yield url
    serve.shutdown()
