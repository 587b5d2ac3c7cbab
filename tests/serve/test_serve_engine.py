"""The replica's decode path without Ray or HTTP: images decoded per batch, bad images, prompt cache,
base64 and the replica options `build_app` sets."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from serve_testlib import png_bytes

from pali.data.pipeline import normalize_images, resize_rgb
from serve.engine import (
    DecodeParams,
    Item,
    decode_items,
    encode_prompt,
    load_model,
    make_prompt,
    prepare_pixels,
)
from serve.preprocess import InputError, decode_base64, decode_image, preprocess_image


@pytest.fixture(scope="module")
def entry(checkpoints):
    return load_model("tiny", checkpoints["tiny"])


def test_batch_preprocessing_is_bit_identical_to_one_image_at_a_time(entry):
    images = [decode_image(png_bytes(s, size=20 + 9 * s), 10**6) for s in range(5)]  # 20..56 px: up and down
    batch = normalize_images(np.stack([resize_rgb(im, entry.image_size) for im in images]))
    assert batch.shape == (5, 3, entry.image_size, entry.image_size) and batch.dtype == np.float32
    for im, px in zip(images, batch, strict=True):
        assert np.array_equal(px, preprocess_image(im, entry.image_size))


def test_items_with_image_bytes_decode_like_preprocessed_items_and_a_bad_image_fails_alone(entry):
    params = DecodeParams(max_new_tokens=5)
    langs = ["en", "fr", "zh", "de"]
    ids = [encode_prompt(entry, make_prompt("caption", lang, None)) for lang in langs]
    data = [png_bytes(10 + i) for i in range(4)]
    big = png_bytes(3, size=40)  # 1600 pixels: over the limit below
    items = [Item(entry, None, ids[i], params, image=data[i]) for i in range(4)]
    items.insert(2, Item(entry, None, ids[0], params, image=b"not an image at all"))
    items.append(Item(entry, None, ids[1], params, image=big, max_image_pixels=1000))
    results, sizes = decode_items(items)
    assert sizes == [4]  # the two bad images took no part in decoding
    bad, too_big = results[2].error, results[5].error
    assert isinstance(bad, InputError) and bad.status == 400 and "not a recognised image" in str(bad)
    assert isinstance(too_big, InputError) and too_big.status == 413 and "40x40" in str(too_big)
    good = [r for i, r in enumerate(results) if i not in (2, 5)]
    for i, r in enumerate(good):
        px = preprocess_image(decode_image(data[i], 10**6), entry.image_size)
        (alone,), _ = decode_items([Item(entry, px, ids[i], params)])
        assert r.error is None and r.batch_size == 4 and r.tokens and r.tokens == alone.tokens


def test_prepare_pixels_leaves_preprocessed_items_alone(entry):
    px = np.zeros((3, entry.image_size, entry.image_size), np.float32)
    items = [Item(entry, px, [5, 1], DecodeParams(3)), Item(entry, None, [5, 1], DecodeParams(3), image=png_bytes(1))]
    assert prepare_pixels(items) == [None, None]
    assert items[0].pixels is px and items[1].pixels.shape == px.shape


def test_prompt_ids_are_cached_per_model_and_checked_every_time(entry):
    prompt = make_prompt("caption", "fr", None)
    first = encode_prompt(entry, prompt)
    assert first == entry.tokenizer.encode(prompt, add_eos=True) and entry.prompt_ids[prompt] == first
    assert encode_prompt(entry, prompt) == first
    long = "red circle " * 200
    for _ in range(2):  # the second call hits the cache and must still refuse
        with pytest.raises(InputError, match="accepts at most"):
            encode_prompt(entry, long)


def test_base64_strict_fast_path_and_line_wrapped_input():
    data = bytes(range(256)) * 4
    assert decode_base64(base64.b64encode(data).decode()) == data
    assert decode_base64(base64.encodebytes(data).decode()) == data  # wrapped at 76 characters
    assert decode_base64("data:image/png;base64," + base64.b64encode(data).decode()) == data
    for bad in ("%%% not base64 %%%", "abc", "ab=c"):
        with pytest.raises(InputError, match="not valid base64"):
            decode_base64(bad)


def test_replicas_run_the_app_on_their_main_event_loop_unless_asked(checkpoints):
    from serve.app import build_app

    var = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
    opts = build_app({"models": {"a": checkpoints["tiny"]}, "num_gpus": 0})._bound_deployment.ray_actor_options
    assert opts["runtime_env"]["env_vars"][var] == "0"
    opts = build_app({"models": {"a": checkpoints["tiny"]}, "num_gpus": 0,
                      "separate_user_thread": True})._bound_deployment.ray_actor_options
    assert var not in opts.get("runtime_env", {}).get("env_vars", {})
