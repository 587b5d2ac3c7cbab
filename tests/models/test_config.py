"""Configs and presets: paper-sized parameter counts (meta device), JSON round trip, override errors."""

from __future__ import annotations

import json

import pytest

from pali import create_model
from pali.config import PRESETS, PaLIConfig, get_preset, mt5, vit

# Component sizes reported in the PaLI paper (Chen et al. 2022, table 1): ViT-G 1.8B, ViT-e 3.9B,
# mT5-Large 1.2B, mT5-XXL 13B (the text numbers include the 250k-row embedding and head).
PAPER = [("pali-3b", "vision", 1.8e9), ("pali-3b", "text", 1.2e9), ("pali-15b", "vision", 1.8e9),
         ("pali-15b", "text", 13e9), ("pali-17b", "vision", 3.9e9), ("pali-17b", "text", 13e9)]


@pytest.fixture(scope="module")
def meta_models():
    return {name: create_model(name, device="meta") for name in ("pali-3b", "pali-15b", "pali-17b")}


@pytest.mark.parametrize("preset, part, paper", PAPER)
def test_paper_parameter_counts(meta_models, preset, part, paper):
    n = meta_models[preset].num_parameters(part)
    assert abs(n / paper - 1) < 0.03, f"{preset} {part}: {n / 1e9:.3f}B vs paper {paper / 1e9}B"


def test_meta_models_hold_no_memory(meta_models):
    assert all(p.is_meta for p in meta_models["pali-17b"].parameters())
    assert meta_models["pali-3b"].cfg.freeze_vision


def test_every_preset_builds_and_tiny_is_tiny():
    for name in PRESETS:
        model = create_model(name, device="meta")
        assert model.cfg.name == name
        assert model.num_parameters() == (model.num_parameters("vision") + model.num_parameters("text")
                                           + sum(p.numel() for p in model.projector.parameters()))
    assert create_model("tiny", device="meta").num_parameters() < 5_000_000


def test_named_sizes_follow_the_papers():
    g = vit("G/14")
    assert (g.width, g.depth, g.mlp_dim, g.num_heads, g.patch_size) == (1664, 48, 8192, 16, 14)
    e = vit("e/14", 588)
    assert (e.width, e.depth, e.mlp_dim, e.image_size, e.num_patches) == (1792, 56, 15360, 588, 42 * 42)
    xxl = mt5("xxl")
    assert (xxl.d_model, xxl.d_ff, xxl.num_heads, xxl.d_kv, xxl.num_layers, xxl.vocab_size) == \
        (4096, 10240, 64, 64, 24, 250112)
    with pytest.raises(ValueError, match="unknown ViT variant 'Q/14'"):
        vit("Q/14")
    with pytest.raises(ValueError, match="unknown mT5 size 'huge'"):
        mt5("huge")


def test_json_round_trip_and_unknown_keys():
    cfg = get_preset("pali-17b")
    again = PaLIConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    bad = cfg.to_dict()
    bad["text"]["d_modle"] = 3
    with pytest.raises(ValueError, match=r"unknown text config keys \['d_modle'\]"):
        PaLIConfig.from_dict(bad)


def test_overrides_copy_and_validate():
    base = get_preset("tiny")
    hi = base.with_overrides(vision__image_size=128, text__dropout_rate=0.1, freeze_vision=True)
    assert (hi.vision.image_size, hi.text.dropout_rate, hi.freeze_vision) == (128, 0.1, True)
    assert base.vision.image_size == 48 and get_preset("tiny") == base
    with pytest.raises(ValueError, match="unknown vision config keys"):
        base.with_overrides(vision__size=3)
    with pytest.raises(ValueError, match="unknown preset 'pali-99b'"):
        get_preset("pali-99b")
