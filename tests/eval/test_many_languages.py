"""112 languages train and evaluate with none dropped; the same image in several languages (COCO-35L
layout) evaluates per language (real Ray Data, a tiny random checkpoint)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

import pali
from pali.data.langs import MANY_LANGS, autonym
from pali.data.pipeline import DataConfig, build_dataset, collate, train_tokenizer_from_shards
from pali.data.schema import write_shard

ROWS_PER_LANG = 1


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """A caption row in each of 112 languages (img2dataset-style tar plus parquet), a tokenizer, a tiny model."""
    root = tmp_path_factory.mktemp("many")
    rows = [{"id": f"img-{k}", "image": _png((40 * k, 255 - 40 * k, 90)), "lang": lang,
             "text": f"{autonym(lang)} {k + 1}"}
            for lang in MANY_LANGS for k in range(ROWS_PER_LANG)]
    half = len(rows) // 2
    shards = [write_shard(rows[:half], str(root / "a.parquet"), "parquet"),
              write_shard(rows[half:], str(root / "b.tar"), "webdataset")]
    tok = train_tokenizer_from_shards(shards, vocab_size=1024)
    model = pali.create_model("tiny", seed=0)
    return {"root": root, "rows": rows, "shards": shards, "tok": tok, "model": model}


@pytest.mark.slow
def test_112_languages_train_and_evaluate(ray_cluster, many, tmp_path):
    from pali.eval.runner import evaluate

    model, tok = many["model"], many["tok"]
    cfg = DataConfig.for_model(model.cfg, batch_size=8, task_weights={"caption": 1.0, "split_caption": 1.0})
    ds = build_dataset(cfg, tok, many["shards"])
    batch = collate(ds.take_batch(len(many["rows"]) + 10, batch_format="numpy"))
    stats = ds.pali_stats.get()
    assert stats["malformed_rows"] == stats["bad_images"] == stats["no_task"] == stats["bad_shards"] == 0
    assert stats["examples"] == len(many["rows"]) == len(batch["id"])
    assert set(batch["lang"]) == set(MANY_LANGS)
    # the prompts carry each language's tag (e.g. "Generate the alt_text in quz at 0:")
    prompts = {tok.decode([i for i in ids.tolist() if i > 1]) for ids in batch["input_ids"]}
    assert any(p.startswith("Generate the alt_text in haw at ") for p in prompts)

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):  # a few steps on every language's examples at once
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"], labels=batch["labels"], image_mask=batch["image_mask"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]

    ckpt = pali.save_pretrained(model.eval(), tok, tmp_path / "ckpt")
    metrics = evaluate(str(ckpt), many["shards"], tasks=["caption"], out_dir=str(tmp_path / "eval"),
                       max_new_tokens=2, batch_size=128)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(saved["langs"]) == set(MANY_LANGS) == set(saved["tasks"]["caption"]["langs"])
    assert all(v["num_examples"] == ROWS_PER_LANG for v in saved["tasks"]["caption"]["langs"].values())
    assert saved["run"]["malformed_rows"] == 0 and metrics["overall"]["num_examples"] == len(many["rows"])
    assert saved["tasks"]["caption"]["num_non_en_langs"] == len(MANY_LANGS) - 1
    assert f"mean ({len(MANY_LANGS)})" in (tmp_path / "eval" / "report.md").read_text()


def _coco(path, captions: dict[int, str]) -> str:
    data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in captions],
            "annotations": [{"image_id": i, "caption": c} for i, c in captions.items()]}
    path.write_text(json.dumps(data, ensure_ascii=False))
    return str(path)


@pytest.mark.slow
def test_same_images_in_two_languages(ray_cluster, many, tmp_path):
    """COCO caption files in en and fr with the same image ids: converted side by side, evaluated per language."""
    from jobs.make_shards import main as make_shards
    from pali.eval.runner import evaluate

    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for i in range(4):
        Image.new("RGB", (20, 20), (60 * i, 0, 0)).save(img_dir / f"{i:012d}.jpg")
    en = _coco(tmp_path / "en.json", {i: f"a red square {i}" for i in range(4)})
    fr = _coco(tmp_path / "fr.json", {i: f"un carré rouge {i}" for i in range(4)})
    out = make_shards(["--out", str(tmp_path / "shards"), "--from-coco", en, fr, "--images", str(img_dir),
                       "--lang", "en", "fr"])
    assert out["rows"] == 8
    ckpt = pali.save_pretrained(many["model"], many["tok"], tmp_path / "ckpt")
    metrics = evaluate(str(ckpt), [str(tmp_path / "shards")], out_dir=str(tmp_path / "eval"), max_new_tokens=3)
    records = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["lang"]) for r in records) == sorted(
        (f"coco-{i}", lang) for i in range(4) for lang in ("en", "fr"))
    assert set(metrics["langs"]) == {"en", "fr"} and metrics["tasks"]["caption"]["langs"]["fr"]["num_examples"] == 4
    assert metrics["tasks"]["caption"]["cider_en"] == metrics["tasks"]["caption"]["langs"]["en"]["cider"]


def test_duplicate_rows_and_prediction_mismatch_named(many, tmp_path):
    """Two rows with one (id, lang) are refused before any model loads; a prediction mismatch says what is wrong."""
    from collections import Counter

    from pali.eval.runner import _check_predictions, _prediction_counts, evaluate

    row = dict(many["rows"][0])
    shard = write_shard([row, {**row, "lang": "fr"}, row], str(tmp_path / "dup.parquet"), "parquet")
    ckpt = pali.save_pretrained(many["model"], many["tok"], tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"id 'img-0' in language 'af' \(2 rows: dup.parquet\).*unique within a "
                                         r"language"):
        evaluate(str(ckpt), [shard], out_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    recs = [{"id": "x", "lang": "en", "task": "caption"}, {"id": "x", "lang": "en", "task": "caption"},
            {"id": "x", "lang": "fr", "task": "caption"}]
    got, keys = _prediction_counts(recs)
    expected = Counter({("caption", "en"): 1, ("caption", "fr"): 1, ("caption", "de"): 1})
    with pytest.raises(RuntimeError) as e:
        _check_predictions(recs, got, keys, expected, tmp_path)
    msg = str(e.value)
    assert "got no prediction (caption in de: 1)" in msg and "scan did not find (caption in en: 1)" in msg
    assert "1 example(s) predicted more than once: (id 'x', lang 'en', task 'caption')" in msg
