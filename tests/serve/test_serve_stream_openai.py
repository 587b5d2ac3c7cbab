"""Streaming, the OpenAI-compatible API, images as people send them, overload and the decode loop's
statistics, over real HTTP against the session's Serve application."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from serve_testlib import SENTENCES, odd_images, png_bytes

pytestmark = pytest.mark.slow


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def events(resp: requests.Response) -> list[tuple[str, dict]]:
    """(event name, JSON data) of a server-sent event stream."""
    out, name = [], "message"
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            out.append((name, json.loads(line[5:])))
            name = "message"
    return out


def test_streaming_pieces_join_to_the_answer_and_equal_the_plain_answer(serve_url):
    cases = [("caption", "zh", None), ("vqa", "ja", "何色?"), ("raw", "ru", SENTENCES[6]), ("caption", "ar", None),
             ("ocr", "hi", None)]
    for i, (task, lang, prompt) in enumerate(cases):
        req = {"image": b64(png_bytes(300 + i)), "task": task, "lang": lang, "max_new_tokens": 24}
        if prompt:
            req["prompt"] = prompt
        plain = requests.post(serve_url + "/v1/generate", json=req, timeout=60).json()
        r = requests.post(serve_url + "/v1/generate", json={**req, "stream": True}, timeout=60, stream=True)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        evs = events(r)
        assert evs[-1][0] == "done" and evs[-1][1]["tokens"] == plain["tokens"] and evs[-1][1]["text"] == plain["text"]
        pieces = [d["text"] for name, d in evs[:-1]]
        assert all(name == "message" for name, _ in evs[:-1]) and "".join(pieces) == plain["text"]
        if "\ufffd" not in plain["text"]:  # a piece never ends inside a multi-byte character
            assert not any("\ufffd" in p for p in pieces)
    bad = requests.post(serve_url + "/v1/generate", json={"image": b64(b"nope"), "stream": True}, timeout=60)
    assert bad.status_code == 400 and "not a recognised" in bad.json()["error"]  # a 4xx, not a broken stream


def test_concurrent_mixed_parameters_equal_decoding_alone(serve_url):
    reqs = []
    for i in range(24):
        r = {"image": b64(png_bytes(400 + i % 6)), "task": "caption", "lang": ["en", "fr", "de"][i % 3],
             "max_new_tokens": [2, 24, 9, 16][i % 4]}
        if i % 5 == 3:
            r["num_beams"] = 2
        elif i % 7 == 4:
            r.update(temperature=0.8, top_k=20, seed=i)
        reqs.append(r)
    alone = [requests.post(serve_url + "/v1/generate", json=r, timeout=60).json()["tokens"] for r in reqs]
    with ThreadPoolExecutor(24) as pool:
        resps = list(pool.map(lambda r: requests.post(serve_url + "/v1/generate", json=r, timeout=120), reqs))
    assert all(r.status_code == 200 for r in resps), [r.text for r in resps if r.status_code != 200][:3]
    got = [r.json()["tokens"] for r in resps]
    assert [i for i in range(24) if got[i] != alone[i]] == []
    assert max(int(r.headers["x-pali-batch-size"]) for r in resps) > 1
    stats = requests.get(serve_url + "/v1/stats", timeout=30).json()
    assert stats["batching"] == "iteration" and stats["cache_rows"] == 16 and stats["queue_length"] == 0
    assert stats["tokens_generated"] > 0 and stats["latency_p99_s"] is not None
    assert stats["feature_cache"]["hits"] > 0  # six images among 48 requests
    assert any(int(k) > 1 for e in stats["engines"].values() for k in e["step_batch_sizes"])


@pytest.mark.parametrize("name", sorted(odd_images()))
def test_images_as_people_send_them_are_answered(serve_url, name):
    r = requests.post(serve_url + "/v1/generate", json={"image": b64(odd_images()[name]), "max_new_tokens": 2},
                      timeout=60)
    assert r.status_code == 200, (name, r.text)


def test_openai_client_plain_streaming_models_and_errors(serve_url, checkpoints):
    import openai

    client = openai.OpenAI(base_url=serve_url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == list(checkpoints)
    assert "checkpoint" not in requests.get(serve_url + "/v1/models", timeout=30).text
    img = png_bytes(500)
    content = [{"type": "text", "text": "Generate the alt_text in en at 0:"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(img)}}]
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=8)
    ref = requests.post(serve_url + "/v1/generate", json={"image": b64(img), "task": "caption", "lang": "en",
                                                          "max_new_tokens": 8}, timeout=60).json()
    assert out.choices[0].message.content == ref["text"] and out.usage.completion_tokens == len(ref["tokens"])
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.prompt_tokens > 9
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                            max_completion_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref["text"] and chunks[-1].usage.completion_tokens == len(ref["tokens"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason
    if len(ref["text"]) > 2:  # stop cuts the answer before the stop string
        cut = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                             max_tokens=8, stop=[ref["text"][2:4]])
        assert cut.choices[0].message.content == ref["text"][:ref["text"].index(ref["text"][2:4])]
        assert cut.choices[0].finish_reason == "stop"
    seeded = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                             max_tokens=8, temperature=1.0, seed=5).choices[0].message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    url_img = [content[0], {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": url_img}])
    assert "does not fetch" in e.value.body["message"] and e.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": content}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "no image"}])
    assert "content parts" in e.value.body["message"]


def test_full_queue_is_a_fast_503_and_a_gone_client_frees_its_row(serve_url, checkpoints):
    """A second application on the same Serve instance with one cache row and one queue place."""
    import time

    from ray import serve

    from serve.app import build_app

    app = build_app({"models": {"tiny": checkpoints["tiny"]}, "num_replicas": 1, "max_batch_size": 1,
                     "max_ongoing_requests": 16, "max_queued_requests": 1, "num_cpus": 0.25,
                     "max_new_tokens_limit": 64})
    serve.run(app, name="small", route_prefix="/small")
    url = serve_url + "/small"
    try:
        long = {"image": b64(png_bytes(1)), "task": "caption", "max_new_tokens": 64}
        # a client that goes away: its stream is closed after the first piece, and the row is freed
        r = requests.post(url + "/v1/generate", json={**long, "stream": True}, stream=True, timeout=60)
        assert r.status_code == 200
        next(r.iter_lines())
        r.close()
        deadline = time.time() + 30
        while requests.get(url + "/v1/stats", timeout=30).json()["cancelled"] < 1:
            assert time.time() < deadline, "the closed stream's row was not freed"
            time.sleep(0.2)
        with ThreadPoolExecutor(8) as pool:
            t0 = time.perf_counter()
            resps = list(pool.map(lambda _: requests.post(url + "/v1/generate", json=long, timeout=120), range(8)))
        codes = sorted(r.status_code for r in resps)
        assert 200 in codes and 503 in codes, codes
        busy = [r for r in resps if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" and "overloaded" in r.json()["error"] for r in busy)
        assert time.perf_counter() - t0 < 60
        stats = requests.get(url + "/v1/stats", timeout=30).json()
        assert stats["rejected"] == len(busy) and stats["cache_rows"] == 1 and stats["max_queued_requests"] == 1
    finally:
        serve.delete("small")
