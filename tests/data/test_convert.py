"""COCO-captions and VQAv2 converters on fixtures made here, via the make_shards job."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from jobs.make_shards import main as make_shards
from pali.data.convert import convert_coco_captions, convert_vqa
from pali.data.pipeline import list_shards
from pali.data.schema import read_shard


def _img(path, colour, size=(40, 30), fmt="JPEG"):
    Image.new("RGB", size, colour).save(path, format=fmt)


@pytest.fixture()
def coco(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    _img(img_dir / "000000000001.jpg", (255, 0, 0), size=(640, 480))
    _img(img_dir / "000000000002.jpg", (0, 255, 0))
    (img_dir / "000000000003.jpg").write_bytes(b"not a jpeg")
    data = {
        "images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"},
                   {"id": 3, "file_name": "000000000003.jpg"}, {"id": 4, "file_name": "missing.jpg"},
                   {"id": 5, "file_name": "000000000002.jpg"}],
        "annotations": [{"image_id": 1, "caption": "A red  wall."}, {"image_id": 1, "caption": "Red paint"},
                        {"image_id": 2, "caption": "Green field"}, {"image_id": 3, "caption": "broken"},
                        {"image_id": 4, "caption": "gone"}, {"image_id": 2}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(data))
    return tmp_path


def test_coco_captions(coco, tmp_path):
    rep = convert_coco_captions(str(coco / "captions.json"), str(coco / "images"), str(tmp_path / "out"),
                                lang="fr", examples_per_shard=1, max_side=64)
    rows = [r for p in rep.paths for r in read_shard(p).rows]
    assert [r["id"] for r in rows] == ["coco-1", "coco-2"] and rep.rows == 2 and len(rep.paths) == 2
    assert rows[0]["text"] == "A red wall." and rows[0]["captions"] == ["A red wall.", "Red paint"]
    assert rows[0]["lang"] == "fr"
    assert max(Image.open(io.BytesIO(rows[0]["image"])).size) == 64  # re-encoded: larger than max_side
    assert rows[1]["image"] == (coco / "images" / "000000000002.jpg").read_bytes()  # small: bytes kept
    assert rep.skipped == {"bad_image": 1, "missing_image": 1, "no_caption": 1, "malformed_annotation": 1}


def test_coco_bad_input(coco, tmp_path):
    with pytest.raises(ValueError, match="unsupported language 'xx'"):
        convert_coco_captions(str(coco / "captions.json"), str(coco / "images"), str(tmp_path), lang="xx")
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="not COCO captions JSON"):
        convert_coco_captions(str(tmp_path / "bad.json"), str(coco / "images"), str(tmp_path))


def test_vqa(tmp_path):
    img_dir = tmp_path / "val2014"
    img_dir.mkdir()
    _img(img_dir / "COCO_val2014_000000000042.jpg", (0, 0, 255))
    _img(img_dir / "COCO_val2014_000000000007.png", (9, 9, 9), fmt="PNG")
    qs = {"questions": [{"image_id": 42, "question": "What color is it?", "question_id": 42000},
                        {"image_id": 42, "question": "Is it red?", "question_id": 42001},
                        {"image_id": 7, "question": "How many?", "question_id": 7000},
                        {"image_id": 99, "question": "Where?", "question_id": 99000}]}
    ans = {"annotations": [
        {"question_id": 42000, "image_id": 42, "multiple_choice_answer": "blue",
         "answers": [{"answer": "blue", "answer_id": i} for i in range(9)] + [{"answer": "navy", "answer_id": 9}]},
        {"question_id": 42001, "image_id": 42, "answers": [{"answer": "no"}, {"answer": "no"}, {"answer": "yes"}]},
        {"question_id": 7000, "image_id": 7, "answers": []},
        {"question_id": 99000, "image_id": 99, "multiple_choice_answer": "here"}]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(ans))
    out = make_shards(["--out", str(tmp_path / "shards"), "--from-vqa", str(tmp_path / "q.json"),
                       str(tmp_path / "a.json"), "--images", str(img_dir), "--format", "webdataset"])
    assert out["rows"] == 2 and out["skipped"] == {"no_answer": 1, "missing_image": 1, "question_without_image": 1}
    rows = [r for p in list_shards(str(tmp_path / "shards")) for r in read_shard(p).rows]
    assert [(r["id"], r["question"], r["answer"]) for r in rows] == [
        ("vqa-42000", "What color is it?", "blue"), ("vqa-42001", "Is it red?", "no")]
    assert rows[0]["answers"] == ["blue"] * 9 + ["navy"] and rows[0]["text"] == ""
    rep = convert_vqa(str(tmp_path / "q.json"), str(tmp_path / "a.json"), str(img_dir), str(tmp_path / "p"))
    assert rep.rows == 2


def test_make_shards_synthetic_cli(tmp_path, capsys):
    out = make_shards(["--out", str(tmp_path / "s"), "--examples", "12", "--langs", "en", "ar", "--seed", "3",
                       "--examples-per-shard", "8", "--tokenizer-vocab", "600"])
    assert out["shards"] == 2 and json.loads(capsys.readouterr().out)["rows"] == 12
    rows = [r for p in list_shards(str(tmp_path / "s")) for r in read_shard(p).rows]
    assert {r["lang"] for r in rows} == {"en", "ar"} and len(rows) == 12
    assert (tmp_path / "s" / "tokenizer.model").is_file() and out["tokenizer"]["vocab_size"] <= 600
    with pytest.raises(SystemExit):
        make_shards(["--out", str(tmp_path / "x"), "--langs", "tlh"])
    with pytest.raises(SystemExit):
        make_shards(["--out", str(tmp_path / "x"), "--from-coco", "c.json"])
