"""The vision stage: classification pretraining of the tower on the shards' image labels (no Ray)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pali
from pali.config import get_preset
from pali.data.schema import write_shard
from pali.data.synthetic import make_example, write_synthetic_shards
from pali.train.vision import (
    SeededState,
    VisionStageConfig,
    build_tower,
    family_accuracy,
    load_labelled,
    multi_hot,
    pretrain_vision,
)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    size = get_preset("tiny").vision.image_size
    train = write_synthetic_shards(str(root / "train"), 1024, seed=0, examples_per_shard=256, image_size=size)
    held = write_synthetic_shards(str(root / "val"), 128, seed=1, examples_per_shard=128, image_size=size)
    return train, held


def test_tower_is_the_seeded_init_of_the_whole_model():
    cfg = get_preset("tiny")
    want = pali.create_model(cfg, seed=3).vision_tower.state_dict()
    got = build_tower(cfg, seed=3).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_seeded_state_overlays_the_tower_and_checks_shapes():
    cfg = get_preset("tiny")
    model = pali.create_model(cfg, seed=5).state_dict()
    tower = {k: torch.full_like(v, 0.5) for k, v in model.items() if k.startswith("vision_tower.")}
    state = SeededState(cfg, 5, tower)
    assert list(state) == list(model) and len(state) == len(model)
    for k in model:
        torch.testing.assert_close(state[k], tower[k] if k in tower else model[k], rtol=0, atol=0, msg=k)
    bigger = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=96))
    with pytest.raises(ValueError, match="pos_embed.*another geometry"):
        SeededState(bigger, 5, tower)
    with pytest.raises(KeyError, match="not in the model"):
        SeededState(cfg, 5, {"vision_tower.nope": torch.zeros(1)})


def test_family_accuracy_counts_whole_label_sets():
    vocab = ["colour:red", "colour:blue", "shape:star"]
    target = multi_hot([["colour:red", "shape:star"], ["colour:blue"], ["colour:red", "bogus:label"]], vocab)
    assert target.tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 0]]
    logits = torch.tensor([[3.0, -1, 2], [-2, 1, 1], [1, 1, -1]])  # row 1 wrong on shape, row 2 on colour
    acc = family_accuracy(logits, target, vocab)
    assert acc == pytest.approx({"all": 1 / 3, "colour": 2 / 3, "shape": 2 / 3})


def test_stage_learns_the_labels(labelled):
    train, held = labelled
    cfg = get_preset("tiny")
    state, report = pretrain_vision(cfg, train, held, VisionStageConfig(steps=400, warmup=50), threads=2,
                                    log=lambda *_: None)
    assert report["train_images"] == 1024 and report["heldout_images"] == 128 and report["malformed_rows"] == 0
    assert report["label_families"] == ["colour", "count", "shape", "text"]
    acc = report["heldout_exact_set"]
    # An untrained head says "absent" to every label: 0 % exact sets. 400 steps on 1024 images measured colour
    # 74 %, count 45 % (a third would be guessing one count for all), shape 30 %, loss 0.64 -> 0.12.
    assert acc["colour"] > 0.6 and acc["count"] > 0.35, acc
    assert report["final_loss"] < 0.3 * report["first_loss"]
    init = build_tower(cfg, 0).state_dict()
    assert state.keys() == {f"vision_tower.{k}" for k in init}
    assert not torch.equal(state["vision_tower.patch_embed.weight"], init["patch_embed.weight"])


def test_shards_without_labels_skip_the_stage_and_bad_images_are_counted(tmp_path):
    rows = [make_example(i, seed=0, image_size=48) for i in range(6)]
    plain = write_shard([{**r, "image_labels": None} for r in rows], str(tmp_path / "plain.parquet"), "parquet")
    state, report = pretrain_vision(get_preset("tiny"), [plain], [], VisionStageConfig(steps=5))
    assert state is None and "image_labels" in report["skipped"]
    rows[2]["image"] = b"\x89PNG not really"
    mixed = write_shard(rows, str(tmp_path / "mixed.parquet"), "parquet")
    got = load_labelled([mixed], 48, max_examples=100)
    assert got.malformed == 1 and len(got.labels) == 5 and got.pixels.shape == (5, 3, 48, 48)
    first = load_labelled([mixed, mixed], 48, max_examples=3)  # stops reading at the limit
    assert first.labels == got.labels[:3] and first.pixels.shape == (3, 3, 48, 48)


def test_labels_under_another_column_name_are_read_through_the_column_map(tmp_path):
    import pyarrow.parquet as pq

    from pali.data.schema import ReadOptions

    rows = [make_example(i, seed=0, image_size=48) for i in range(4)]
    path = write_shard(rows, str(tmp_path / "ours.parquet"), "parquet")
    table = pq.read_table(path)
    pq.write_table(table.rename_columns(["tags" if c == "image_labels" else c for c in table.column_names]),
                   str(tmp_path / "theirs.parquet"))
    theirs = [str(tmp_path / "theirs.parquet")]
    assert load_labelled(theirs, 48, max_examples=10).labels == []
    got = load_labelled(theirs, 48, 10, ReadOptions.make("image_labels=tags"))
    assert got.labels == [list(r["image_labels"]) for r in rows]
    cfg = VisionStageConfig(steps=2, read=ReadOptions.make("image_labels=tags"))
    assert cfg.fingerprint(get_preset("tiny"), theirs) != VisionStageConfig(steps=2).fingerprint(get_preset("tiny"),
                                                                                                theirs)
