"""PaLI's recipe from pretrained towers: tiny random Hugging Face mT5 + SigLIP -> `jobs.import_hf` ->
`jobs.pretrain --init-from` (the low-res phase) -> the high-res phase `--init-from` that result, read from
object storage (moto's S3 server on loopback), at twice the image size. Real Ray Train runs on the
session cluster; the towers are made here (no downloads)."""

from __future__ import annotations

import pytest
import torch

import pali
from pali.train.config import TrainConfig
from pali.train.consolidation import consolidate
from pali.train.metrics import read_metrics
from pali.train.sharded_checkpoint import latest_complete
from pali.train.trainer import fit, run_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def imported(train_shards, tmp_path_factory):
    """A serving checkpoint imported from tiny random HF towers, with a tokenizer trained on the shards."""
    import transformers
    from transformers import MT5Config, MT5ForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel

    from jobs import import_hf
    from pali.data.pipeline import list_shards
    from pali.data.schema import iter_rows
    from pali.tokenizer import Tokenizer

    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("hf-towers")
    torch.manual_seed(0)
    MT5ForConditionalGeneration(MT5Config(vocab_size=1024, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
                                          num_decoder_layers=2, relative_attention_max_distance=20,
                                          dropout_rate=0.0, tie_word_embeddings=False)).save_pretrained(root / "mt5")
    texts = [t for row in iter_rows(list_shards([str(train_shards / "train")]))
             for t in (row.get("text"), row.get("question"), row.get("answer"), row.get("ocr_text")) if t]
    Tokenizer.train(texts, vocab_size=1000, out_path=root / "mt5" / "spiece.model")
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, image_size=32, patch_size=8)
                      ).save_pretrained(root / "siglip")
    ckpt = root / "imported"
    assert import_hf.main(["--text", str(root / "mt5"), "--vision", str(root / "siglip"), "--out", str(ckpt)]) == 0
    return ckpt


def _cfg(root, out, **kw) -> TrainConfig:
    base = dict(data=[str(root / "train")], eval_data=[str(root / "val")], global_batch=8, micro_batch=8,
                checkpoint_every=100, log_every=1, warmup_steps=1, output_dir=str(out), workers=1,
                vision_pretrain_steps=0)
    base.update(kw)
    return TrainConfig(**base)


def test_import_then_pretrain_then_high_res_phase(ray_cluster, train_shards, imported, tmp_path, s3, monkeypatch):
    from pali.models.generate import generate
    from pali.models.vit import interpolate_pos_embed

    start, tok = pali.load_pretrained(imported)
    assert start.cfg.vision.image_size == 32

    # Low-res phase from the imported towers: the loss falls and the imported tokenizer is the run's.
    low_cfg = _cfg(train_shards, tmp_path / "low", steps=10, lr=3e-3, name="low", init_from=str(imported))
    low, mcfg, run_tok = fit(low_cfg)
    assert low.error is None and low.metrics["step"] == 10
    assert run_tok.model_proto == tok.model_proto and mcfg.text.vocab_size == start.cfg.text.vocab_size
    losses = [r["loss"] for r in read_metrics(tmp_path / "low" / "metrics.jsonl")]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    low_final = consolidate(latest_complete(run_dir(low_cfg)), tmp_path / "low-final", run_tok)
    low_model, low_tok = pali.load_pretrained(low_final)
    assert low_tok.model_proto == tok.model_proto

    # High-res phase at twice the size, lr 0, from the low-res checkpoint on object storage: the serving
    # checkpoint is at 64 px, its position embeddings are exactly the low-res ones interpolated (where the
    # workers read them from the bucket), and it generates.
    from pali import storage

    monkeypatch.setenv("PALI_CACHE_DIR", str(tmp_path / "cache"))
    storage.upload_dir(low_final, f"{s3.url}/low-final")
    high_cfg = _cfg(train_shards, tmp_path / "high", steps=1, lr=0.0, name="high", init_from=f"{s3.url}/low-final",
                    model_overrides={"vision__image_size": 64})
    high, hcfg, _ = fit(high_cfg)
    assert high.error is None and hcfg.vision.image_size == 64
    assert not (tmp_path / "high" / "init-64px.safetensors").exists()  # no full interpolated copy on the driver
    high_final = consolidate(latest_complete(run_dir(high_cfg)), tmp_path / "high-final", run_tok)
    model, _ = pali.load_pretrained(high_final)
    assert model.cfg.vision.image_size == 64
    v = model.cfg.vision
    want = interpolate_pos_embed(low_model.vision_tower.pos_embed.detach(), v.class_token, 64 // v.patch_size)
    torch.testing.assert_close(model.vision_tower.pos_embed.detach(), want, rtol=0, atol=0)
    for name, p in low_model.named_parameters():  # everything else carried over unchanged (lr 0)
        if not name.endswith("pos_embed"):
            assert torch.equal(model.get_parameter(name), p), name
    ids = torch.tensor([run_tok.encode("Generate the alt_text in en at 0:") + [1]])
    out = generate(model, torch.rand(1, 3, 64, 64), ids, max_new_tokens=4)
    assert out.shape[0] == 1 and out.shape[1] >= 1
