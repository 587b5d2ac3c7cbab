"""The HTTP API of a running Serve application: answers, batching, multiplexing and every bad input."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from PIL import Image
from serve_testlib import png_bytes, png_header_bomb

from serve.engine import trim
from serve.preprocess import decode_image, preprocess_image

pytestmark = pytest.mark.slow


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(url: str, timeout: float = 60, **kw) -> requests.Response:
    return requests.post(url + "/v1/generate", timeout=timeout, **kw)


def reference(ckpt: str, requests_: list[dict]) -> list[list[int]]:
    """Each request decoded alone, in this process, with `model.generate` (no batching)."""
    import pali
    from serve.engine import make_prompt

    model, tok = pali.load_pretrained(ckpt)
    torch.set_num_threads(1)
    out = []
    for r in requests_:
        img = decode_image(base64.b64decode(r["image"]), 10**6)
        pixels = torch.from_numpy(preprocess_image(img, model.cfg.vision.image_size))[None]
        ids = torch.tensor([tok.encode(make_prompt(r["task"], r["lang"], r.get("prompt")))])
        gen = model.generate(pixels, ids, max_new_tokens=r["max_new_tokens"], num_beams=r.get("num_beams", 1))
        out.append(trim(gen[0].tolist()))
    return out


def test_health_models_docs_and_demo(serve_url, checkpoints):
    assert requests.get(serve_url + "/healthz", timeout=30).json()["status"] == "ok"
    info = requests.get(serve_url + "/v1/models", timeout=30).json()
    assert [m["name"] for m in info["models"]] == list(checkpoints) and info["default"] == "tiny"
    assert {"caption", "vqa", "ocr", "raw"} <= set(info["tasks"]) and "zh" in info["languages"]
    spec = requests.get(serve_url + "/openapi.json", timeout=30).json()
    body = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert "image" in body["application/json"]["schema"]["properties"]
    assert "swagger" in requests.get(serve_url + "/docs", timeout=30).text.lower()
    page = requests.get(serve_url + "/", timeout=30)
    assert page.status_code == 200 and 'id="drop"' in page.text


def test_json_and_multipart_give_the_unbatched_answer(serve_url, checkpoints):
    img = png_bytes(7)
    req = {"image": b64(img), "task": "vqa", "lang": "de", "prompt": "welche Farbe?", "max_new_tokens": 6}
    alone = requests.get(serve_url + "/v1/stats", timeout=30).json()["unbatched_alone"]
    r1 = post(serve_url, json=req)
    assert r1.status_code == 200, r1.text
    # Nothing else was in flight: decoded at once instead of waiting out the batch timeout.
    assert r1.headers["x-pali-batch-size"] == "1"
    assert requests.get(serve_url + "/v1/stats", timeout=30).json()["unbatched_alone"] == alone + 1
    body = r1.json()
    assert set(body) == {"text", "lang", "model", "tokens"} and body["lang"] == "de" and body["model"] == "tiny"
    r2 = post(serve_url, files={"image": ("x.png", img, "image/png")},
              data={"task": "vqa", "lang": "de", "prompt": "welche Farbe?", "max_new_tokens": "6"})
    assert r2.status_code == 200, r2.text
    assert r2.json() == body
    assert body["tokens"] == reference(checkpoints["tiny"], [req])[0]
    beam = {**req, "num_beams": 3}
    r3 = post(serve_url, json=beam)
    assert r3.status_code == 200 and r3.json()["tokens"] == reference(checkpoints["tiny"], [beam])[0]
    r4 = post(serve_url, json={**req, "temperature": 0.8})  # sampling works and stays in the vocabulary
    assert r4.status_code == 200 and 1 <= len(r4.json()["tokens"]) <= 6


def test_64_concurrent_requests_are_batched_and_each_gets_its_own_answer(serve_url, checkpoints):
    tasks = [("caption", "en", None), ("ocr", "fr", None), ("vqa", "zh", "什么颜色?"), ("caption", "ar", None),
             ("vqa", "ru", "сколько кругов?"), ("ocr", "hi", None), ("caption", "ja", None), ("raw", "en", "hi")]
    reqs = []
    for i in range(64):
        task, lang, prompt = tasks[i % len(tasks)]
        r = {"image": b64(png_bytes(100 + i)), "task": task, "lang": lang, "max_new_tokens": 6 + (i % 2) * 2}
        if prompt:
            r["prompt"] = prompt
        reqs.append(r)
    with ThreadPoolExecutor(64) as pool:
        resps = list(pool.map(lambda r: post(serve_url, json=r, timeout=120), reqs))
    assert all(r.status_code == 200 for r in resps), [r.text for r in resps if r.status_code != 200][:3]
    sizes = [int(r.headers["x-pali-batch-size"]) for r in resps]
    assert max(sizes) > 1, f"no request was batched: {sizes}"
    got = [r.json()["tokens"] for r in resps]
    want = reference(checkpoints["tiny"], reqs)
    assert len({tuple(t) for t in want}) >= 8, "answers too alike to tell requests apart"
    mismatched = [i for i in range(64) if got[i] != want[i]]
    assert not mismatched, f"requests {mismatched} got another answer than unbatched decoding"
    stats = requests.get(serve_url + "/v1/stats", timeout=30).json()
    assert stats["max_batch_size_seen"] > 1 and stats["requests"] >= 64


def test_model_field_and_multiplex_header_pick_the_checkpoint(serve_url, checkpoints):
    req = {"image": b64(png_bytes(11)), "task": "caption", "lang": "es", "max_new_tokens": 6}
    want_a, want_b = reference(checkpoints["tiny"], [req])[0], reference(checkpoints["tiny-b"], [req])[0]
    assert want_a != want_b
    by_field = post(serve_url, json={**req, "model": "tiny-b"})
    assert by_field.status_code == 200 and by_field.json()["model"] == "tiny-b"
    assert by_field.json()["tokens"] == want_b
    # max_models_per_replica=1: loading tiny-b evicted tiny (least recently used)
    loaded = {m["name"]: m["loaded"] for m in requests.get(serve_url + "/v1/models", timeout=30).json()["models"]}
    assert loaded["tiny-b"] and not loaded["tiny"]
    by_header = post(serve_url, json=req, headers={"serve_multiplexed_model_id": "tiny"})
    assert by_header.json()["model"] == "tiny" and by_header.json()["tokens"] == want_a
    assert post(serve_url, json=req).json()["tokens"] == want_a  # default model


def _bad_cases() -> list[tuple[str, dict, int, str]]:
    img = png_bytes(5)
    ok = {"image": b64(img), "task": "caption", "lang": "en", "max_new_tokens": 4}
    buf = io.BytesIO()
    Image.new("RGB", (600, 600), (200, 30, 30)).save(buf, format="PNG")
    big = b64(buf.getvalue())  # 600x600 > the fixture's 512x512 pixel limit, in a small body
    return [
        ("bad base64", {**ok, "image": "%%% not base64 %%%"}, 400, "not valid base64"),
        ("not an image", {**ok, "image": b64(b"just some text, definitely not a PNG")}, 400, "not a recognised"),
        ("truncated", {**ok, "image": b64(img[: len(img) // 2])}, 400, "truncated"),
        ("pixel limit", {**ok, "image": big}, 413, "600x600"),
        ("bomb header", {**ok, "image": b64(png_header_bomb(30000, 30000))}, 413, "pixels"),
        ("task", {**ok, "task": "translate"}, 400, "unsupported task 'translate'"),
        ("lang", {**ok, "lang": "xx"}, 400, "unsupported language 'xx'"),
        ("vqa without question", {**ok, "task": "vqa"}, 400, "needs the question"),
        ("prompt too long", {**ok, "task": "raw", "prompt": "red circle " * 200}, 400, "accepts at most 48"),
        ("max_new_tokens 0", {**ok, "max_new_tokens": 0}, 400, "max_new_tokens=0"),
        ("max_new_tokens huge", {**ok, "max_new_tokens": 100000}, 400, "max_new_tokens=100000"),
        ("num_beams 0", {**ok, "num_beams": 0}, 400, "num_beams=0"),
        ("num_beams huge", {**ok, "num_beams": 99}, 400, "num_beams=99"),
        ("temperature negative", {**ok, "temperature": -0.5}, 400, "temperature=-0.5"),
        ("temperature huge", {**ok, "temperature": 50}, 400, "temperature=50"),
        ("sampling with beams", {**ok, "temperature": 0.7, "num_beams": 2}, 400, "sampling needs"),
        ("unknown model", {**ok, "model": "gpt-9"}, 404, "unknown model 'gpt-9'"),
        ("wrong type", {**ok, "max_new_tokens": "many"}, 422, "max_new_tokens"),
        ("unknown field", {**ok, "colour": "red"}, 422, "colour"),
        ("missing image", {"task": "caption", "lang": "en"}, 422, "image"),
        ("body too large", {**ok, "image": "A" * 300_000}, 413, "limit"),
    ]


@pytest.mark.parametrize("name, body, status, needle", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_json_input_is_a_4xx_json_error(serve_url, name, body, status, needle):
    r = post(serve_url, json=body)
    assert r.status_code == status, (name, r.status_code, r.text)
    assert needle in r.json()["error"], r.json()


def test_other_bad_requests(serve_url):
    cases = [
        (dict(data=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (dict(data=b"[1, 2]", headers={"content-type": "application/json"}), 400, "expected an object"),
        (dict(data=b"hello", headers={"content-type": "text/plain"}), 415, "content-type"),
        (dict(files={"task": (None, "caption")}), 400, "'image' file field"),
        (dict(json={"image": b64(png_bytes(1))}, headers={"serve_multiplexed_model_id": "nope"}), 404, "nope"),
        (dict(json={"image": b64(png_bytes(1)), "model": "broken"}), 503, "could not be loaded"),
    ]
    for kw, status, needle in cases:
        r = post(serve_url, **kw)
        assert r.status_code == status, (kw, r.text)
        assert needle in json.loads(r.text)["error"]
    r = requests.get(serve_url + "/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    # the replica is still healthy and answering after all of that
    assert post(serve_url, json={"image": b64(png_bytes(2)), "max_new_tokens": 3}).status_code == 200


def test_whole_call_mode_batches_calls_and_refuses_what_only_iteration_batching_does(serve_url, checkpoints):
    """`batching: whole_call` (kept for comparison): concurrent calls share batches and each gets its unbatched
    answer; streaming and seeded sampling, which need the iteration engine, are a 400 naming it."""
    from ray import serve

    from serve.app import build_app

    serve.run(build_app({"models": {"tiny": checkpoints["tiny"]}, "batching": "whole_call", "num_replicas": 1,
                         "max_batch_size": 8, "batch_wait_timeout_s": 0.2, "num_cpus": 0.5}),
              name="whole", route_prefix="/whole")
    try:
        url = serve_url + "/whole"
        reqs = [{"image": b64(png_bytes(300 + i)), "task": "caption", "lang": "en", "max_new_tokens": 5}
                for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            resps = list(pool.map(lambda r: post(url, json=r, timeout=120), reqs))
        assert all(r.status_code == 200 for r in resps), [r.text for r in resps if r.status_code != 200][:3]
        assert max(int(r.headers["x-pali-batch-size"]) for r in resps) > 1
        assert [r.json()["tokens"] for r in resps] == reference(checkpoints["tiny"], reqs)
        for extra in ({"stream": True}, {"seed": 7, "temperature": 0.8}):
            r = post(url, json={**reqs[0], **extra})
            assert r.status_code == 400 and "batching: iteration" in r.json()["error"], r.text
    finally:
        serve.delete("whole")
