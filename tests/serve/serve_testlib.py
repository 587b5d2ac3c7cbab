"""Helpers of the serving tests: tiny checkpoints, test images, ports."""

from __future__ import annotations

import io
import socket
import time

import numpy as np
from PIL import Image

SENTENCES = [
    "a red circle above a blue square", "two green triangles on a white background",
    "un cercle rouge au-dessus d'un carré bleu", "deux triangles verts sur fond blanc",
    "ein roter Kreis über einem blauen Quadrat", "un círculo rojo sobre un cuadrado azul",
    "красный круг над синим квадратом", "دائرة حمراء فوق مربع أزرق", "नीले वर्ग के ऊपर लाल वृत्त",
    "蓝色正方形上方的红色圆圈", "青い四角の上の赤い丸", "파란 사각형 위의 빨간 원", "what colour is the circle?",
]


def make_checkpoint(out_dir, seed: int, tok=None, **overrides):
    """A tiny random PaLI (with config `overrides`) and a tokenizer trained on a few multilingual sentences."""
    import pali
    from pali.config import get_preset
    from pali.data.prompts import prompt_templates
    from pali.tokenizer import Tokenizer

    if tok is None:
        tok = Tokenizer.train(SENTENCES * 4 + prompt_templates(), vocab_size=1000, seed=0)
    cfg = get_preset("tiny").with_overrides(text__vocab_size=tok.vocab_size, **overrides)
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


def odd_images() -> dict[str, bytes]:
    """Images as people send them: alpha, palette, grayscale, CMYK, 16-bit, WebP, animated GIF, EXIF
    rotation, 1x1 and extreme aspect ratios."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))

    def enc(img: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    rotated = rgb.copy()
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    sixteen = Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16))
    return {
        "rgba_png": enc(rgb.convert("RGBA"), "PNG"), "la_png": enc(rgb.convert("LA"), "PNG"),
        "palette_png": enc(rgb.convert("P"), "PNG"),
        "palette_transparent": enc(rgb.convert("P"), "PNG", transparency=0),
        "grayscale": enc(rgb.convert("L"), "PNG"), "cmyk_jpeg": enc(rgb.convert("CMYK"), "JPEG"),
        "png_16bit": enc(sixteen, "PNG"), "webp": enc(rgb, "WEBP"),
        "animated_gif": enc(rgb.convert("P"), "GIF", save_all=True, append_images=[rgb.convert("P").rotate(90)]),
        "exif_rotated_jpeg": enc(rotated, "JPEG", exif=exif), "1x1": enc(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "2000x2": enc(Image.new("RGB", (2000, 2), (200, 0, 0)), "PNG"),
        "2x2000": enc(Image.new("RGB", (2, 2000)), "PNG"),
    }
