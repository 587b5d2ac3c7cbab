"""Hugging Face import/export: exact parity with tiny random HF models built here (no downloads).

Text-only logits (mT5 with an untied head, T5 v1.0 with a tied scaled head), vision `last_hidden_state`
(ViTModel, SiglipVisionModel, PaliGemma's tower from sharded safetensors, Siglip2VisionModel NaFlex),
export -> `from_pretrained` round trips, greedy and beam-search token ids
against HF `generate`, the import/export jobs, and the error messages of bad directories.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    MT5Config,
    MT5ForConditionalGeneration,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTModel,
)

from pali import load_pretrained, save_pretrained
from pali.hf import from_hf, load_hf_tokenizer, siglip_name, t5_name, to_hf, vit_name
from pali.models.t5 import T5
from pali.models.vit import ViT
from pali.tokenizer import Tokenizer

transformers.logging.set_verbosity_error()
VOCAB = 320
TEXT = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
            relative_attention_max_distance=20, dropout_rate=0.0)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=8)
TOL = 1e-4


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Tiny random HF checkpoints on disk: untied mT5 (+ spiece.model), tied T5 v1.0, ViT, SigLIP."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    mt5 = MT5ForConditionalGeneration(MT5Config(**TEXT, tie_word_embeddings=False))
    # Untie the head (transformers 5 ties at construction) and make EOS likely so some beams stop early.
    head = torch.randn(VOCAB, 32) * 2.0
    head[1] *= 4.0
    mt5.lm_head.weight = torch.nn.Parameter(head)
    mt5.save_pretrained(root / "mt5")
    texts = ["a photo of a cat", "ein Foto eines Hundes", "une photo d'un oiseau", "猫の写真", "фото собаки"] * 40
    Tokenizer.train(texts, vocab_size=300, num_sentinels=10, out_path=root / "mt5" / "spiece.model")
    T5ForConditionalGeneration(T5Config(**TEXT, feed_forward_proj="relu")).save_pretrained(root / "t5")
    ViTModel(ViTConfig(**VISION), add_pooling_layer=False).save_pretrained(root / "vit")
    SiglipVisionModel(SiglipVisionConfig(**VISION)).save_pretrained(root / "siglip")
    return root


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    dec = torch.randint(2, VOCAB, (5, 6), generator=g)
    return ids, mask, dec, torch.randn(2, 3, 32, 32, generator=g)


def _hf_logits(hf, ids, mask, dec):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits


def _ours(model, ids, mask, dec):
    with torch.no_grad():
        return model(pixel_values=None, input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits


def test_name_maps_cover_every_tensor():
    from pali.hf import text_config_from_hf, vision_config_from_hf

    for tied in (False, True):
        cfg = text_config_from_hf({"model_type": "mt5", **TEXT})
        cfg.tie_word_embeddings = tied
        ours = list(T5(cfg).state_dict())
        hf = MT5ForConditionalGeneration(MT5Config(**TEXT)).state_dict()
        expected = set(hf) - {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} \
            - ({"lm_head.weight"} if tied else set())
        assert {t5_name(n) for n in ours} == expected and len(ours) == len(expected)
    vit_cfg = vision_config_from_hf({"model_type": "vit", **VISION})
    assert {vit_name(n) for n in ViT(vit_cfg).state_dict()} == \
        set(load_file(str(_saved(ViTModel(ViTConfig(**VISION), add_pooling_layer=False)))))
    sig_cfg = vision_config_from_hf({"model_type": "siglip_vision_model", **VISION})
    assert {siglip_name(n) for n in ViT(sig_cfg).state_dict()} == \
        set(load_file(str(_saved(SiglipVisionModel(SiglipVisionConfig(**VISION, vision_use_head=False))))))


def _saved(model):
    import tempfile

    d = tempfile.mkdtemp()
    model.save_pretrained(d)
    return f"{d}/model.safetensors"


def test_mt5_untied_text_parity(dirs, inputs):
    ids, mask, dec, _ = inputs
    hf = MT5ForConditionalGeneration.from_pretrained(dirs / "mt5").eval()
    assert not torch.equal(hf.lm_head.weight, hf.shared.weight)  # really untied
    model = from_hf(dirs / "mt5", dirs / "vit")
    assert not model.cfg.text.tie_word_embeddings and model.cfg.text.feed_forward_proj == "gated-gelu"
    diff = (_hf_logits(hf, ids, mask, dec) - _ours(model, ids, mask, dec)).abs().max()
    assert diff <= TOL, diff


def test_t5_v10_tied_text_parity(dirs, inputs):
    ids, mask, dec, _ = inputs
    hf = T5ForConditionalGeneration.from_pretrained(dirs / "t5").eval()
    model = from_hf(dirs / "t5", dirs / "siglip")
    assert model.cfg.text.tie_word_embeddings and model.cfg.text.feed_forward_proj == "relu"
    assert not hasattr(model.text, "lm_head")
    diff = (_hf_logits(hf, ids, mask, dec) - _ours(model, ids, mask, dec)).abs().max()
    assert diff <= TOL, diff


def test_tied_unscaled_mt5_and_pytorch_bin(dirs, inputs, tmp_path):
    """An mT5 saved with a tied head (transformers' default) and only a pickle-free .bin still matches."""
    ids, mask, dec, _ = inputs
    torch.manual_seed(3)
    hf = MT5ForConditionalGeneration(MT5Config(**TEXT)).eval()
    hf.config.to_json_file(tmp_path / "config.json")
    torch.save({k: v.clone() for k, v in hf.state_dict().items()}, tmp_path / "pytorch_model.bin")
    model = from_hf(tmp_path, dirs / "vit")
    assert (_hf_logits(hf, ids, mask, dec) - _ours(model, ids, mask, dec)).abs().max() <= TOL
    # imported as an untied head holding a copy, not as a parameter aliasing the embedding
    assert model.text.lm_head.weight.data_ptr() != model.text.shared.weight.data_ptr()
    save_pretrained(model, None, tmp_path / "ckpt")


@pytest.mark.parametrize("kind, cls", [("vit", ViTModel), ("siglip", SiglipVisionModel)])
def test_vision_parity(dirs, inputs, kind, cls):
    px = inputs[3]
    hf = cls.from_pretrained(dirs / kind).eval()
    model = from_hf(dirs / "t5", dirs / kind)
    assert model.cfg.vision.layout == kind and model.cfg.vision.class_token == (kind == "vit")
    assert model.cfg.vision.activation == ("gelu" if kind == "vit" else "gelu_tanh")
    with torch.no_grad():
        diff = (hf(pixel_values=px).last_hidden_state - model.vision(px)).abs().max()
    assert diff <= TOL, diff


def _strip_hf(seqs: torch.Tensor) -> torch.Tensor:
    """HF output minus the decoder start token, with everything after the first EOS set to pad (HF's beam
    search fills finished rows with EOS, its greedy search with pad)."""
    out = seqs[:, 1:].clone()
    for row in out:
        eos = (row == 1).nonzero()
        if len(eos):
            row[int(eos[0]) + 1:] = 0
    return out


@pytest.fixture(scope="module")
def gen_models(dirs):
    return MT5ForConditionalGeneration.from_pretrained(dirs / "mt5").eval(), from_hf(dirs / "mt5", dirs / "vit")


@pytest.mark.parametrize("num_beams, length_penalty", [(1, 1.0), (3, 1.0), (3, 0.6), (4, 1.0), (4, 0.6)])
def test_generate_matches_hf(gen_models, inputs, num_beams, length_penalty):
    hf, model = gen_models
    ids, mask, _, _ = inputs
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=num_beams,
                       length_penalty=length_penalty, do_sample=False)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=num_beams,
                         length_penalty=length_penalty)
    assert torch.equal(got, _strip_hf(want)), (got, want)
    ended = (got == 1).any(1)
    assert ended.any() and not ended.all()  # the prompts cover early EOS and running to max_new_tokens


def test_import_and_export_jobs_round_trip(dirs, inputs, tmp_path):
    from jobs import export, import_hf

    ids, mask, dec, px = inputs
    ckpt = tmp_path / "ckpt"
    assert import_hf.main(["--text", str(dirs / "mt5"), "--vision", str(dirs / "vit"), "--out", str(ckpt)]) == 0
    model, tok = load_pretrained(ckpt)
    assert tok.model_proto == load_hf_tokenizer(dirs / "mt5").model_proto
    assert export.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    hf = MT5ForConditionalGeneration.from_pretrained(tmp_path / "hf" / "text").eval()
    assert (_hf_logits(hf, ids, mask, dec) - _ours(model, ids, mask, dec)).abs().max() <= TOL
    vit = ViTModel.from_pretrained(tmp_path / "hf" / "vision", add_pooling_layer=False).eval()
    with torch.no_grad():
        assert (vit(pixel_values=px).last_hidden_state - model.vision(px)).abs().max() <= TOL
    assert (tmp_path / "hf" / "text" / "spiece.model").read_bytes() == tok.model_proto
    proj = load_file(str(tmp_path / "hf" / "projector.safetensors"))
    assert torch.equal(proj["weight"], model.projector.weight)
    # the exported directories import again to the same model
    again = from_hf(tmp_path / "hf" / "text", tmp_path / "hf" / "vision")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("projector"))


def test_export_tied_t5_and_siglip(dirs, inputs, tmp_path):
    ids, mask, dec, px = inputs
    model = from_hf(dirs / "t5", dirs / "siglip")
    to_hf(model, tmp_path)
    assert json.loads((tmp_path / "text" / "config.json").read_text())["model_type"] == "t5"
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path / "text").eval()
    assert (_hf_logits(hf, ids, mask, dec) - _ours(model, ids, mask, dec)).abs().max() <= TOL
    sig = SiglipVisionModel.from_pretrained(tmp_path / "vision").eval()
    with torch.no_grad():
        assert (sig(pixel_values=px).last_hidden_state - model.vision(px)).abs().max() <= TOL


def test_import_image_size_interpolates(dirs, tmp_path):
    from jobs import import_hf

    import_hf.main(["--text", str(dirs / "t5"), "--vision", str(dirs / "siglip"), "--out", str(tmp_path / "c"),
                    "--image-size", "64", "--tokenizer", str(dirs / "mt5" / "spiece.model"),
                    "--dropout-rate", "0.05", "--freeze-vision"])
    model, _ = load_pretrained(tmp_path / "c")
    assert model.cfg.text.dropout_rate == 0.05 and model.cfg.freeze_vision
    assert model.cfg.vision.image_size == 64 and model.vision_tower.pos_embed.shape[1] == 64
    assert model.vision(torch.randn(1, 3, 64, 64)).shape == (1, 64, 32)


def test_bad_directories_name_the_problem(dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path, dirs / "vit")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mt5", **TEXT}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_hf(tmp_path, dirs / "vit")
    state = load_file(str(dirs / "mt5" / "model.safetensors"))
    del state["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="decoder.block.1.layer.2.DenseReluDense.wo.weight"):
        from_hf(tmp_path, dirs / "vit")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="expected 't5' or 'mt5'"):
        from_hf(tmp_path, dirs / "vit")
    with pytest.raises(ValueError, match="expected 'vit'"):
        from_hf(dirs / "t5", dirs / "mt5")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mt5", **TEXT, "d_ff": 64}))
    save_file(load_file(str(dirs / "mt5" / "model.safetensors")), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="shape mismatches.*expected"):
        from_hf(tmp_path, dirs / "vit")
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        load_hf_tokenizer(dirs / "t5")


def test_text_only_import_with_fresh_vision_tower(dirs, inputs):
    from pali.config import VisionConfig

    ids, mask, dec, px = inputs
    vis = VisionConfig(image_size=32, patch_size=8, width=24, depth=1, mlp_dim=48, num_heads=2)
    model = from_hf(dirs / "mt5", vision=vis, seed=1)
    hf = MT5ForConditionalGeneration.from_pretrained(dirs / "mt5").eval()
    assert (_hf_logits(hf, ids, mask, dec) - _ours(model, ids, mask, dec)).abs().max() <= TOL
    assert model.vision(px).shape == (2, 16, 24) and model.cfg.vision.layout == "siglip"
    assert torch.equal(model.projector.weight, from_hf(dirs / "mt5", vision=vis, seed=1).projector.weight)


# --- PaliGemma's SigLIP tower and SigLIP 2 NaFlex towers ------------------------------------------------

PG_TEXT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
               intermediate_size=32, vocab_size=300, head_dim=8)
S2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
          num_patches=16)


@pytest.fixture(scope="module")
def tower_dirs(tmp_path_factory):
    """A PaliGemma checkpoint in many small safetensors shards, and a Siglip2VisionModel (NaFlex) with its
    preprocessor_config.json (max_num_patches 24)."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        Siglip2VisionConfig,
        Siglip2VisionModel,
    )

    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(4)
    pg = PaliGemmaForConditionalGeneration(PaliGemmaConfig(vision_config={**VISION, "projection_dim": 16},
                                                           text_config=PG_TEXT, projection_dim=16))
    pg.save_pretrained(root / "paligemma", max_shard_size="20KB")
    s2 = Siglip2VisionModel(Siglip2VisionConfig(**S2))
    with torch.no_grad():
        for p in s2.parameters():
            p.normal_(0, 0.2)
    s2.save_pretrained(root / "siglip2")
    (root / "siglip2" / "preprocessor_config.json").write_text(json.dumps({"max_num_patches": 24,
                                                                           "patch_size": 8}))
    return root


def test_paligemma_tower_imports_from_shards_one_tensor_at_a_time(dirs, tower_dirs, inputs):
    from transformers import PaliGemmaForConditionalGeneration

    from pali.hf import LazyWeights, load_weights, read_config, vision_state_from_hf

    d = tower_dirs / "paligemma"
    assert len(list(d.glob("model-*.safetensors"))) > 3  # really sharded
    weights = load_weights(d)
    assert isinstance(weights, LazyWeights) and weights.reads == 0
    cfg, state = vision_state_from_hf(weights, read_config(d), where=str(d))
    assert weights.reads == len(state) < len(weights)  # only the tower's tensors were read
    assert cfg.layout == "siglip" and cfg.image_size == 32 and not cfg.naflex
    model = from_hf(dirs / "t5", d)
    hf = PaliGemmaForConditionalGeneration.from_pretrained(d).eval()
    px = inputs[3]
    with torch.no_grad():
        want = hf.model.vision_tower(pixel_values=px).last_hidden_state
        assert (want - model.vision(px)).abs().max() <= TOL
    # export: the tower as the SiglipVisionModel it is inside PaliGemma, same outputs
    to_hf(model, tower_dirs / "pg-export")
    sig = SiglipVisionModel.from_pretrained(tower_dirs / "pg-export" / "vision").eval()
    with torch.no_grad():
        assert (sig(pixel_values=px).last_hidden_state - want).abs().max() <= TOL


def test_paligemma_hub_config_without_image_size():
    from pali.hf import vision_config_from_hf

    cfg = vision_config_from_hf({"model_type": "paligemma", "vision_config": {
        "hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model", "num_attention_heads": 16,
        "num_hidden_layers": 27, "num_image_tokens": 1024, "patch_size": 14, "projection_dim": 2048}})
    assert (cfg.image_size, cfg.width, cfg.depth, cfg.num_tokens) == (448, 1152, 27, 1024)  # paligemma-3b-mix-448


def test_siglip2_naflex_import_and_export_round_trip(dirs, tower_dirs, tmp_path):
    from transformers import Siglip2VisionModel

    from jobs import export, import_hf
    from pali.models import naflex

    ckpt = tmp_path / "ckpt"
    assert import_hf.main(["--text", str(dirs / "mt5"), "--vision", str(tower_dirs / "siglip2"),
                           "--out", str(ckpt)]) == 0
    model, _ = load_pretrained(ckpt)
    v = model.cfg.vision
    assert (v.naflex, v.layout, v.max_num_patches, v.pos_grid) == (True, "siglip2", 24, 4)
    g = torch.Generator().manual_seed(5)
    packed = naflex.pack_images([torch.randn(3, 16, 64, generator=g), torch.randn(3, 40, 32, generator=g)], 8, 24)
    patches, spatial = naflex.unpack(packed)
    pmask = naflex.patch_mask(spatial, 24).int()
    hf = Siglip2VisionModel.from_pretrained(tower_dirs / "siglip2").eval()
    with torch.no_grad():
        want = hf(pixel_values=patches, pixel_attention_mask=pmask, spatial_shapes=spatial).last_hidden_state
        assert (model.vision(packed) - want).abs().max() <= TOL
    assert export.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    back = Siglip2VisionModel.from_pretrained(tmp_path / "hf" / "vision").eval()
    with torch.no_grad():
        got = back(pixel_values=patches, pixel_attention_mask=pmask, spatial_shapes=spatial).last_hidden_state
    assert (got - want).abs().max() <= TOL
    again = from_hf(tmp_path / "hf" / "text", tmp_path / "hf" / "vision")
    assert again.cfg.vision == model.cfg.vision
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("vision_tower."))
