"""The evaluation job end to end on a tiny random checkpoint and generated shards (real Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pali
from pali.data.pipeline import train_tokenizer_from_shards
from pali.data.schema import iter_rows, write_parquet_shard
from pali.data.synthetic import make_example, write_synthetic_shards
from pali.data.tasks import supported_tasks
from pali.eval.report import format_table


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    """13 synthetic rows in 3 uneven shards (5+5+3), a trained tokenizer and a random tiny checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    shards = write_synthetic_shards(str(root / "shards"), 13, langs=["en", "zh", "fr"], seed=3,
                                    examples_per_shard=5)
    tok = train_tokenizer_from_shards(shards, vocab_size=1024)
    ckpt = pali.save_pretrained(pali.create_model("tiny", seed=0), tok, root / "ckpt")
    return {"root": root, "shards": shards, "ckpt": str(ckpt)}


def _expected(shards, tasks, langs=None):
    keys = set()
    for row in iter_rows(shards):
        if langs and row["lang"] not in langs:
            continue
        keys |= {(row["id"], t) for t in tasks if t in supported_tasks(row)}
    return keys


@pytest.mark.slow
def test_evaluate_job_end_to_end(ray_cluster, tiny_eval, tmp_path, capsys):
    """`python -m jobs.evaluate` (its `main`, in-process on the session cluster) over 3 uneven shards."""
    from jobs.evaluate import main

    out = tmp_path / "out"
    shard_dir = tiny_eval["shards"][0].rsplit("/", 1)[0]
    rc = main(["--checkpoint", tiny_eval["ckpt"], "--data", shard_dir, "--max-new-tokens", "6",
               "--batch-size", "4", "--out", str(out)])
    assert rc == 0
    assert "caption/cider" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    keys = [(r["id"], r["task"]) for r in records]
    # Every example exactly once: 13 rows x their supported tasks, no tail dropped, no duplicates.
    assert len(keys) == len(set(keys))
    assert set(keys) == _expected(tiny_eval["shards"], ("caption", "vqa", "ocr"))
    assert {r["task"] for r in records} == {"caption", "vqa", "ocr"}
    for r in records:
        assert set(r) == {"id", "lang", "task", "prompt", "prediction", "references", "tokenized_references",
                          "error"}
        assert r["references"] and all(isinstance(x, str) for x in r["references"])
        assert r["error"] == ""
        assert r["prompt"].startswith("Answer in " if r["task"] == "vqa" else "Generate the ")

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["num_examples"] == len(records)
    assert set(metrics["langs"]) == {"en", "zh", "fr"}
    assert metrics["run"]["num_predictions"] == len(records) and metrics["run"]["preset"] == "tiny"
    for task, headline in (("caption", "cider"), ("vqa", "accuracy"), ("ocr", "anls")):
        t = metrics["tasks"][task]
        assert t["num_examples"] == sum(1 for r in records if r["task"] == task)
        assert 0.0 <= t[headline] <= 1000.0
        assert metrics["overall"][f"{task}/{headline}"] == t[headline]
    report = (out / "report.md").read_text()
    assert "per_language.png" in report and "caption/cider" in report
    assert (out / "per_language.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert format_table(metrics).splitlines()[-1].startswith("mean")


@pytest.mark.slow
def test_language_filter_beam_search_and_single_task(ray_cluster, tiny_eval, tmp_path):
    from pali.eval.runner import evaluate

    metrics = evaluate(tiny_eval["ckpt"], tiny_eval["shards"], tasks=["vqa"], langs=["zh"],
                       out_dir=str(tmp_path), max_new_tokens=4, batch_size=3, num_beams=2)
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert {(r["id"], r["task"]) for r in records} == _expected(tiny_eval["shards"], ("vqa",), ("zh",))
    assert list(metrics["tasks"]) == ["vqa"] and list(metrics["langs"]) == ["zh"]


def test_bad_checkpoint_and_filters_fail_before_inference(tiny_eval, tmp_path):
    from pali.eval.runner import evaluate

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((Path(tiny_eval["ckpt"]) / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="does not load"):
        evaluate(str(broken), tiny_eval["shards"], out_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="does not load"):
        evaluate(str(tmp_path / "missing"), tiny_eval["shards"], out_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"unknown language filter \['xx'\]"):
        evaluate(tiny_eval["ckpt"], tiny_eval["shards"], langs=["xx"], out_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"unknown or missing evaluation tasks \['retrieval'\]"):
        evaluate(tiny_eval["ckpt"], tiny_eval["shards"], tasks=["retrieval"], out_dir=str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(tiny_eval["ckpt"], [str(tmp_path / "nope.parquet")], out_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_cli_bad_input_exit_code(tiny_eval, tmp_path, capsys):
    from jobs.evaluate import main

    rc = main(["--checkpoint", str(tmp_path), "--data", *tiny_eval["shards"], "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "does not load" in capsys.readouterr().err


def test_missing_references_and_absent_language(tiny_eval, tmp_path):
    from pali.eval.runner import evaluate

    # Captions only: no question/answer and no ocr_text anywhere.
    rows = [{**make_example(i, seed=5, langs=["en"]), "question": None, "answer": None, "ocr_text": None}
            for i in range(3)]
    shard = write_parquet_shard(rows, str(tmp_path / "captions.parquet"))
    with pytest.raises(ValueError, match=r"no references for requested task\(s\) \['vqa'\]"):
        evaluate(tiny_eval["ckpt"], [shard], tasks=["caption", "vqa"], out_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"language filter \['de'\] matches no rows"):
        evaluate(tiny_eval["ckpt"], [shard], langs=["de"], out_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_predictor_batches_and_failed_generate(tiny_eval):
    """The actor class without Ray: a good batch decodes; a bad one yields errors, not an exception."""
    import numpy as np

    from pali.eval.inference import OUTPUT_COLUMNS, Predictor

    pred = Predictor(tiny_eval["ckpt"], max_new_tokens=3)
    tok = pred.tokenizer
    ids = np.zeros((2, 48), dtype=np.int64)
    for i, prompt in enumerate(["Generate the alt_text in en at 0:", "Answer in fr: quoi?"]):
        x = tok.encode(prompt)
        ids[i, : len(x)] = x
    size = pred.model.cfg.vision.image_size
    batch = {"pixel_values": np.zeros((2, 3, size, size), np.float32), "input_ids": ids,
             "attention_mask": (ids != 0).astype(np.int64), "id": np.array(["a", "b"], dtype=object),
             "lang": np.array(["en", "fr"], dtype=object), "task": np.array(["caption", "vqa"], dtype=object),
             "prompt": np.array(["p", "q"], dtype=object), "references": np.array(['["x"]', '["y"]'], dtype=object)}
    out = pred(batch)
    assert set(out) == set(OUTPUT_COLUMNS)
    assert list(out["error"]) == ["", ""] and list(out["id"]) == ["a", "b"]
    assert all(isinstance(p, str) for p in out["prediction"])
    bad = pred({**batch, "pixel_values": np.zeros((2, 3, 17, 17), np.float32)})  # wrong image size
    assert list(bad["prediction"]) == ["", ""]
    assert all(e.startswith("generate: ") for e in bad["error"])
