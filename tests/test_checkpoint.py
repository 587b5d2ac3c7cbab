"""Serving checkpoints: exact round trip, atomic replace, and errors for missing files or mismatched configs."""

from __future__ import annotations

import json

import pytest
import torch

import pali
from pali import create_model, load_pretrained, save_pretrained
from pali.serving_checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from pali.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["a photo of a cat", "ein Foto eines Hundes", "une photo d'un oiseau", "фото собаки"] * 30
    return Tokenizer.train(texts, vocab_size=300, num_sentinels=10)


@pytest.fixture(scope="module")
def model(tiny_config):
    return create_model(tiny_config.with_overrides(freeze_vision=True), seed=0).eval()


class BrokenTokenizer:
    """A tokenizer whose save fails half way (disk full, killed process...)."""

    def save(self, path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")


def test_round_trip_is_exact(model, tokenizer, tmp_path):
    out = save_pretrained(model, tokenizer, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE])
    loaded, tok = load_pretrained(out)
    assert loaded.cfg == model.cfg and loaded.cfg.name == "tiny"
    assert tok.model_proto == tokenizer.model_proto
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.requires_grad for p in loaded.vision_tower.parameters())  # frozen state survives
    ids = torch.randint(3, 2048, (2, 5))
    px = torch.randn(2, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    with torch.no_grad():
        assert torch.equal(model(px, ids, labels=ids).logits, loaded(px, ids, labels=ids).logits)
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["format_version"] == 1 and meta["model"]["text"]["vocab_size"] == 2048


def test_failing_save_leaves_previous_checkpoint(model, tokenizer, tmp_path):
    target = tmp_path / "ckpt"
    save_pretrained(model, tokenizer, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    changed = create_model(model.cfg, seed=1)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(changed, BrokenTokenizer(), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no half-written sibling left behind
    with pytest.raises(OSError):
        save_pretrained(changed, BrokenTokenizer(), tmp_path / "fresh")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_replaces_existing(model, tokenizer, tmp_path):
    target = tmp_path / "ckpt"
    save_pretrained(create_model(model.cfg, seed=1), tokenizer, target)
    save_pretrained(model, tokenizer, target)
    loaded, _ = load_pretrained(target)
    assert torch.equal(loaded.projector.weight, model.projector.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE])
def test_missing_file_is_named(model, tokenizer, tmp_path, missing):
    out = save_pretrained(model, tokenizer, tmp_path / "ckpt")
    (out / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        load_pretrained(out)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_config_not_matching_weights(model, tokenizer, tmp_path):
    out = save_pretrained(model, tokenizer, tmp_path / "ckpt")
    meta = json.loads((out / CONFIG_FILE).read_text())
    meta["model"]["text"]["d_ff"] = 512
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"wi_0.weight: \(256, 128\) vs expected \(512, 128\)"):
        load_pretrained(out)
    meta["model"]["text"]["d_ff"] = 256
    meta["model"]["text"]["num_layers"] = 3
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"missing \['text.encoder.blocks.2"):
        load_pretrained(out)
    meta["model"]["text"]["num_layerz"] = 2
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_layerz"):
        load_pretrained(out)


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "pali-3b", "pali-15b", "pali-17b"])
def test_create_model_under_meta_device_context(preset):
    """`with torch.device("meta"): create_model(name)` (the torchtitan / accelerate idiom) builds every
    preset without memory, exactly as `create_model(name, device="meta")` does."""
    with torch.device("meta"):
        ambient = pali.create_model(preset)  # seed=None: the base seed is drawn on the CPU, not on meta
    explicit = pali.create_model(preset, device="meta")
    assert all(t.is_meta for t in [*ambient.parameters(), *ambient.buffers()])
    shapes = {k: tuple(v.shape) for k, v in ambient.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in explicit.state_dict().items()}


def test_init_tensor_and_seeded_build_ignore_an_ambient_meta_context():
    from pali.factory import init_tensor

    ref = pali.create_model("tiny", seed=3)
    name, value = next(iter(ref.state_dict().items()))
    with torch.device("meta"):
        t = init_tensor(ref.cfg, name, value.shape, 3)
        on_cpu = pali.create_model("tiny", device="cpu", seed=3)
    assert t.device.type == "cpu" and torch.equal(t, value)
    assert all(torch.equal(a, b) for a, b in zip(on_cpu.state_dict().values(), ref.state_dict().values(), strict=True))
