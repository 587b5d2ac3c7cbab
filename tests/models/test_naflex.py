"""SigLIP 2 NaFlex: preprocessing and the tower against Hugging Face (`Siglip2ImageProcessorPil`,
`Siglip2VisionModel`, tiny random models built here), the packed transport format, and PaLI with a NaFlex
tower (padding masked, a training step, generate on a 2:1 image)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import Siglip2VisionConfig, Siglip2VisionModel
from transformers.models.siglip2.image_processing_pil_siglip2 import (
    Siglip2ImageProcessorPil,
    get_image_size_for_max_num_patches,
)

from pali import create_model
from pali.config import get_preset
from pali.hf import vision_state_from_hf
from pali.models import naflex
from pali.models.vit import ViT

transformers.logging.set_verbosity_error()
P, BUDGET = 8, 24
HF_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=P,
                 num_patches=16, vision_use_head=False)
TOL = 1e-4


@pytest.fixture(scope="module")
def towers():
    """A random Siglip2VisionModel (weights drawn wide so differences show) and our import of it."""
    torch.manual_seed(0)
    hf = Siglip2VisionModel(Siglip2VisionConfig(**HF_VISION)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    cfg, state = vision_state_from_hf(hf.state_dict(), {"model_type": "siglip2_vision_model", **HF_VISION},
                                      max_num_patches=BUDGET)
    ours = ViT(cfg).eval()
    ours.load_state_dict({k.removeprefix("vision_tower."): v for k, v in state.items()})
    return hf, ours


def _hf_out(hf, packed):
    patches, spatial = naflex.unpack(packed)
    mask = naflex.patch_mask(spatial, patches.shape[1])
    with torch.no_grad():
        return hf(pixel_values=patches, pixel_attention_mask=mask.int(), spatial_shapes=spatial).last_hidden_state


@pytest.mark.parametrize("size", [(37, 100), (100, 37), (240, 480), (16, 16), (1000, 3), (64, 64)])
def test_target_size_equals_the_processor(size):
    for budget in (1, 24, 256):
        assert naflex.target_size(*size, 16, budget) == get_image_size_for_max_num_patches(*size, 16, budget)


def test_preprocess_equals_siglip2_image_processor():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((30, 61), (50, 20))]
    proc = Siglip2ImageProcessorPil(patch_size=P, max_num_patches=BUDGET)
    want = proc(images=images, return_tensors="pt")
    buf = io.BytesIO()
    images[0].save(buf, format="PNG")
    got = torch.stack([torch.from_numpy(naflex.preprocess(buf.getvalue(), P, BUDGET)),
                       torch.from_numpy(naflex.preprocess(images[1], P, BUDGET))])
    patches, spatial = naflex.unpack(got)
    assert torch.equal(spatial, want["spatial_shapes"].long())
    assert spatial.tolist() == [[3, 7], [8, 3]]  # aspect ratio kept (not squashed), within the budget
    assert torch.equal(naflex.patch_mask(spatial, BUDGET), want["pixel_attention_mask"].bool())
    torch.testing.assert_close(patches, want["pixel_values"], atol=1e-5, rtol=0)


def test_header_survives_dtype_casts_and_bad_input_is_named():
    imgs = [torch.randn(3, 8, 8 * 20), torch.randn(3, 8 * 3, 8)]
    packed = naflex.pack_images(imgs, P, BUDGET)
    assert packed.shape == (2, 1 + BUDGET, naflex.packed_shape(3, P, BUDGET)[1])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert naflex.unpack(packed.to(dtype))[1].tolist() == [[1, 20], [3, 1]]
    with pytest.raises(ValueError, match="valid header"):
        naflex.unpack(torch.randn(2, 1 + BUDGET, 192))
    with pytest.raises(ValueError, match="at most max_num_patches 24"):
        naflex.pack_images([torch.randn(3, 40, 48)], P, BUDGET)
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        naflex.patchify(torch.randn(3, 12, 16), P)


def test_tower_equals_siglip2_on_a_batch_of_different_sizes(towers):
    hf, ours = towers
    g = torch.Generator().manual_seed(1)
    imgs = [torch.randn(3, 16, 48, generator=g), torch.randn(3, 32, 40, generator=g),
            torch.randn(3, 8, 8, generator=g), torch.randn(3, 48, 32, generator=g)]
    packed = naflex.pack_images(imgs, P, BUDGET)
    want = _hf_out(hf, packed)
    with torch.no_grad():
        got = ours(packed)
        explicit = ours(*naflex.unpack(packed))  # Siglip2VisionModel's own inputs
    assert got.shape == (4, BUDGET, 32)
    assert (got - want).abs().max() <= TOL  # every position, padding included
    assert (explicit - want).abs().max() <= TOL
    mask = ours.token_mask(packed)
    assert mask.sum(1).tolist() == [12, 20, 1, 24]
    # an image alone, as float[1, C, H, W], gives its real tokens of the padded batch
    for i, im in enumerate(imgs):
        with torch.no_grad():
            alone = ours(im[None])
        assert (alone[0] - want[i, :alone.shape[1]]).abs().max() <= TOL


def test_tower_rejects_images_that_do_not_fit(towers):
    _, ours = towers
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        ours(torch.randn(1, 3, 20, 16))
    with pytest.raises(ValueError, match="max_num_patches 24"):
        ours(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"float\[B, 25, 192\]"):
        ours(torch.randn(1, 30, 192))


def _naflex_pali():
    cfg = get_preset("tiny").with_overrides(vision__naflex=True, vision__layout="siglip2",
                                            vision__max_num_patches=18)
    return create_model(cfg, seed=0)


def test_pali_masks_padding_trains_and_generates_on_a_2_to_1_image():
    model = _naflex_pali()
    p = model.cfg.vision.patch_size  # 16; the position grid is 3x3, resized to each image's grid
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(3, 3 * p, 6 * p, generator=g)  # 2:1 (3x6 = 18 patches, the whole budget)
    tall = torch.randn(3, 4 * p, 2 * p, generator=g)  # 1:2 (8 patches, 10 padding)
    packed = naflex.pack_images([wide, tall], p, 18)
    ids = torch.randint(3, 2048, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(3, 2048, (2, 5), generator=g)
    model.eval()
    enc, enc_mask = model.encode(packed, ids, mask)
    assert enc_mask[:, :18].sum(1).tolist() == [18, 8] and enc.shape == (2, 18 + 7, 128)

    # padding is masked: garbage in the padded patches changes nothing
    noisy = packed.clone()
    noisy[1, 1 + 8:] = torch.randn(10, noisy.shape[2], generator=g) * 10
    with torch.no_grad():
        a = model(pixel_values=packed, input_ids=ids, attention_mask=mask, labels=labels)
        b = model(pixel_values=noisy, input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(a.logits, b.logits)
    out = model.generate(packed, ids, mask, max_new_tokens=6)
    assert torch.equal(out, model.generate(noisy, ids, mask, max_new_tokens=6))
    # the 2:1 image given alone as float[1, 3, 48, 96] decodes the same as in the packed batch
    assert torch.equal(model.generate(wide[None], ids[:1], mask[:1], max_new_tokens=6), out[:1])
    assert out.shape == (2, 6)

    # a training step: gradients reach the tower's position grid, the loss goes down
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        loss = model(pixel_values=packed, input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        assert model.vision_tower.pos_embed.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


def test_naflex_config_shapes():
    model = _naflex_pali()
    v = model.cfg.vision
    assert v.num_tokens == 18 and v.pos_grid == 3 and model.vision_tower.pos_embed.shape == (1, 9, 96)
    assert model.flops_per_example(7, 5) > 0
    from pali.train.loop import batch_shapes

    # what non-reading ranks allocate equals what the pipeline delivers
    assert batch_shapes(model.cfg, 2)["pixel_values"][0] == (2, *naflex.packed_shape(3, 16, 18)) == (2, 19, 768)


def test_data_pipeline_keeps_the_aspect_ratio_and_the_model_reads_its_batches(tmp_path):
    from pali.data.pipeline import DataConfig, collate, process_shard
    from pali.data.schema import write_parquet_shard
    from pali.tokenizer import Tokenizer

    rng = np.random.default_rng(3)
    rows = []
    for i, (w, h) in enumerate([(200, 100), (60, 120), (90, 90)]):  # 2:1, 1:2, square
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        rows.append({"id": f"r{i}", "image": buf.getvalue(), "lang": "en", "text": "a red square on grass"})
    path = write_parquet_shard(rows, str(tmp_path / "s.parquet"))
    tok = Tokenizer.train(["a red square on grass", "a photo of a cat", "caption en"] * 30, vocab_size=400)
    model = _naflex_pali().eval()
    cfg = DataConfig.for_model(model.cfg, task_weights={"caption": 1.0})
    assert (cfg.naflex_patch_size, cfg.max_num_patches) == (16, 18)
    batch = process_shard(cfg, tok, path)
    assert batch["pixel_values"].shape == (3, 19, 16 * 16 * 3)
    assert naflex.unpack(torch.from_numpy(batch["pixel_values"]))[1].tolist() == [[3, 6], [6, 3], [4, 4]]
    assert np.array_equal(batch["pixel_values"][0], naflex.preprocess(rows[0]["image"], 16, 18))
    b = collate(batch)
    with torch.no_grad():
        out = model(pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    labels=b["labels"])
        assert torch.isfinite(out.loss)
        ids = model.generate(b["pixel_values"], b["input_ids"], b["attention_mask"], max_new_tokens=4)
    assert ids.shape[0] == 3


def test_so400m_naflex_preset_is_siglip2_so400m_patch16_naflex():
    from pali.hf import vision_config_from_hf

    # the vision part of google/siglip2-so400m-patch16-naflex's config.json (preprocessor: 256 patches)
    hub = {"model_type": "siglip2", "vision_config": {
        "hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
        "num_patches": 256, "patch_size": 16, "model_type": "siglip2_vision_model"}}
    assert get_preset("pali-so400m-naflex").vision == vision_config_from_hf(hub, max_num_patches=256)
