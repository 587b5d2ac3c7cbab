"""A NaFlex checkpoint over HTTP: a 2:1 image keeps its aspect ratio (a 3 x 6 patch grid, padded to the
budget and masked), and `/v1/generate` answers exactly what `model.generate` gives in Python."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
import torch
from PIL import Image

pytestmark = pytest.mark.slow


def _png(w: int, h: int) -> bytes:
    arr = np.random.default_rng(5).integers(0, 256, size=(h, w, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_naflex_2_to_1_image_answers_as_model_generate(serve_url, checkpoints):
    import pali
    from pali.models import naflex
    from serve.engine import make_prompt, trim

    img = _png(96, 48)
    model, tok = pali.load_pretrained(checkpoints["naflex"])
    pixels = torch.from_numpy(naflex.image_input(model.cfg.vision, Image.open(io.BytesIO(img))))[None]
    _, grid = naflex.unpack(pixels)
    assert grid.tolist() == [[3, 6]]  # the aspect ratio kept within the 18-patch budget
    prompt = make_prompt("caption", "en", None)
    want = trim(model.generate(pixels, torch.tensor([tok.encode(prompt)]), max_new_tokens=6)[0].tolist())
    for stream in (False, True):
        body = {"model": "naflex", "image": base64.b64encode(img).decode(), "task": "caption", "lang": "en",
                "max_new_tokens": 6, "stream": stream}
        r = requests.post(serve_url + "/v1/generate", json=body, timeout=180)
        assert r.status_code == 200, r.text
        if not stream:
            assert r.json()["tokens"] == want
        else:
            assert "event: done" in r.text and str(want).replace(" ", "") in r.text.replace(" ", "")
