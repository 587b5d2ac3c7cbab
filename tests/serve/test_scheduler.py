"""Iteration-level batching without Ray or HTTP: every answer equals decoding that request alone."""

from __future__ import annotations

import threading

import pytest
import torch
from serve_testlib import png_bytes

from serve.engine import encode_prompt, load_model, make_prompt, trim
from serve.features import FeatureCache
from serve.preprocess import InputError, decode_image, preprocess_image
from serve.scheduler import GenRequest, QueueFull, SamplingParams, Scheduler


@pytest.fixture(scope="module")
def entry(checkpoints):
    return load_model("tiny", checkpoints["tiny"])


def alone(entry, image: bytes, ids: list[int], p: SamplingParams) -> list[int]:
    """`model.generate` on this request alone (the reference)."""
    px = torch.from_numpy(preprocess_image(decode_image(image, 10**6), entry.image_size))[None]
    kw = {"max_new_tokens": p.max_new_tokens, "num_beams": p.num_beams}
    if p.temperature > 0:
        kw.update(do_sample=True, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                  generator=torch.Generator().manual_seed(p.seed))
    return trim(entry.model.generate(px, torch.tensor([ids]), **kw)[0].tolist())


class Waiter:
    """Collects a request's events (they arrive on the loop thread)."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, kind, value):
        self.events.append((kind, value))
        if kind in ("done", "error"):
            self.done.set()


def test_mixed_parameters_share_steps_and_equal_decoding_alone(entry):
    sched = Scheduler(entry, rows=4, max_len=16, max_queued=64, features=FeatureCache(2**20))
    prompts = [make_prompt("caption", lang, None) for lang in ("en", "fr", "zh", "ar")] + \
        [make_prompt("vqa", "de", "welche Farbe?")]
    params = [SamplingParams(2), SamplingParams(12), SamplingParams(7, num_beams=3),
              SamplingParams(9, temperature=0.9, top_k=50, seed=7), SamplingParams(16),
              SamplingParams(5, temperature=1.3, top_p=0.8, seed=3), SamplingParams(3)]
    reqs, waiters, refs = [], [], []
    for i in range(14):  # more requests than rows: admission happens between steps
        p = params[i % len(params)]
        ids = encode_prompt(entry, prompts[i % len(prompts)])
        img = png_bytes(200 + i % 9)  # repeated images hit the feature cache
        w = Waiter()
        reqs.append(GenRequest(ids, img, p, w, stream=i % 2 == 0))
        waiters.append(w)
        refs.append(alone(entry, img, ids, p))
    for r in reqs:
        sched.submit(r)
    for w in waiters:
        assert w.done.wait(60)
    got = [w.events[-1][1].tokens for w in waiters]
    assert [w.events[-1][0] for w in waiters] == ["done"] * 14
    bad = [i for i in range(14) if got[i] != refs[i]]
    assert not bad, [(got[i], refs[i]) for i in bad]
    for i, w in enumerate(waiters):  # streamed token events grow one token at a time
        toks = [v for k, v in w.events if k == "token"]
        assert all(a == b[: len(a)] for a, b in zip(toks, toks[1:], strict=False))
        if i % 2 and reqs[i].params.num_beams == 1:
            assert not toks
    snap = sched.snapshot()
    assert max(int(k) for k in snap["step_batch_sizes"]) == 4  # rows were shared
    assert snap["cache_rows_used"] == 0 and snap["queue_length"] == 0
    assert sched.features.hits >= 1 and sched.features.misses <= 9  # 9 distinct images
    sched.close()


def test_bounded_queue_cancel_and_bad_image(entry):
    sched = Scheduler(entry, rows=1, max_len=16, max_queued=2)
    ids = encode_prompt(entry, make_prompt("caption", "en", None))
    long = [Waiter() for _ in range(3)]
    reqs = [GenRequest(ids, png_bytes(1), SamplingParams(16), w) for w in long]
    sched.submit(reqs[0])
    while not sched.running:  # the first is running; two fit in the queue, the fourth does not
        pass
    sched.submit(reqs[1])
    sched.submit(reqs[2])
    with pytest.raises(QueueFull):
        sched.submit(GenRequest(ids, png_bytes(1), SamplingParams(4), Waiter()))
    sched.cancel(reqs[0])
    sched.cancel(reqs[1])
    assert long[2].done.wait(60) and long[2].events[-1][0] == "done"
    assert not long[0].done.is_set() and not long[1].done.is_set()  # cancelled: never answered
    assert sched.stats.cancelled == 2
    bad = Waiter()
    sched.submit(GenRequest(ids, b"not an image", SamplingParams(4), bad))
    assert bad.done.wait(30) and isinstance(bad.events[-1][1], InputError)
    sched.close()
