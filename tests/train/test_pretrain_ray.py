"""Pretraining on a real local Ray cluster: checkpoints, resume, a killed worker, resharding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import pali
from pali.train.config import TrainConfig
from pali.train.consolidation import consolidate
from pali.train.metrics import read_metrics
from pali.train.sharded_checkpoint import is_complete, latest_complete, read_meta
from pali.train.trainer import fit, run_dir

pytestmark = pytest.mark.slow


def _cfg(root, out, **kw) -> TrainConfig:
    base = dict(data=[str(root / "train")], eval_data=[str(root / "val")], global_batch=8, micro_batch=4,
                steps=4, checkpoint_every=2, log_every=1, warmup_steps=2, output_dir=str(out), workers=2,
                cpus_per_worker=1.0, max_failures=2, vision_pretrain_steps=0)
    base.update(kw)
    return TrainConfig(**base)


def test_train_checkpoint_resume_consolidate(ray_cluster, train_shards, tmp_path, capsys):
    # A short vision stage first: the main phase must start from its tower and keep it frozen.
    cfg = _cfg(train_shards, tmp_path / "run", vision_pretrain_steps=40)
    result, mcfg, tok = fit(cfg)
    assert result.error is None and result.metrics["step"] == 4 and mcfg.freeze_vision
    ckpt = latest_complete(run_dir(cfg))
    assert ckpt is not None and is_complete(ckpt) and read_meta(ckpt)["step"] == 4
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for key in ("loss", "tokens_per_s", "images_per_s", "step_time_s", "data_wait_s", "mfu", "loss/caption"):
        assert key in recs[-1] or key == "loss/caption" and any(k.startswith("loss/") for k in recs[-1])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    report = json.loads((tmp_path / "run" / "vision" / "report.json").read_text())
    assert report["steps"] == 40 and report["train_images"] == 256
    assert set(report["heldout_exact_set"]) == {"all", "colour", "count", "shape", "text"}

    # Rerunning the same run name with more steps resumes at step 4 and does not redo steps 1-4, nor the
    # vision stage.
    lines_before = (tmp_path / "run" / "metrics.jsonl").read_text().count("\n")
    report_written = (tmp_path / "run" / "vision" / "report.json").stat().st_mtime_ns
    capsys.readouterr()
    result2, mcfg2, _ = fit(_cfg(train_shards, tmp_path / "run", steps=6, vision_pretrain_steps=40))
    assert result2.metrics["step"] == 6 and mcfg2.freeze_vision
    new_lines = (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") - lines_before
    assert new_lines == 2, "the resumed run must only train steps 5 and 6"
    assert "vision stage: reusing" in capsys.readouterr().out
    assert (tmp_path / "run" / "vision" / "report.json").stat().st_mtime_ns == report_written

    final = consolidate(latest_complete(run_dir(cfg)), tmp_path / "final", tok)
    model, tok2 = pali.load_pretrained(final)
    assert model.cfg.text.vocab_size == mcfg.text.vocab_size and tok2.vocab_size == tok.vocab_size
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 1000
    tower = load_file(str(tmp_path / "run" / "vision" / "tower.safetensors"))
    trained = load_file(str(final / "model.safetensors"))
    init = pali.create_model(mcfg, seed=cfg.seed).state_dict()
    assert tower.keys() == {k for k in trained if k.startswith("vision_tower.")}
    for k, v in tower.items():  # the workers started from the stage's tower and kept it frozen for 6 steps
        torch.testing.assert_close(trained[k], v, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(v, init[k]) for k, v in tower.items()), "the stage did not train the tower"
    assert not torch.equal(trained["projector.weight"], init["projector.weight"])  # the main phase trained


def _kill_a_worker_at(monkeypatch, step: int) -> None:
    """Install the fault hook: rank 1 (or 0 alone) exits abruptly before `step` (0-based), once."""
    monkeypatch.setenv("PALI_STEP_HOOKS", "pali.testing.faults:exit_once")
    monkeypatch.setenv("PALI_FAULT_STEP", str(step))


def test_checkpoint_reshards_from_tp2_dp2_to_tp1_then_to_a_group_with_an_idle_rank(ray_cluster, train_shards,
                                                                                 tmp_path):
    # FSDP2 over the DP group on both sides: its sharded optimizer state is gathered and re-sharded too.
    cfg = _cfg(train_shards, tmp_path / "run", steps=2, tp=2, workers=4, cpus_per_worker=0.5, name="reshard",
               dp_mode="fsdp")
    result, _, tok = fit(cfg)
    assert result.error is None
    first = latest_complete(run_dir(cfg))
    assert read_meta(first)["layout"] == {"dp": 2, "pp": 1, "tp": 2}
    consolidate(first, tmp_path / "tp2", tok)
    # Same run, now TP=1 on 2 workers, with lr 0: one more step must leave the weights exactly as loaded.
    cfg2 = _cfg(train_shards, tmp_path / "run", steps=3, tp=1, workers=2, lr=0.0, name="reshard", dp_mode="fsdp")
    result2, _, _ = fit(cfg2)
    assert result2.error is None and result2.metrics["step"] == 3
    second = latest_complete(run_dir(cfg2))
    assert read_meta(second)["layout"] == {"dp": 2, "pp": 1, "tp": 1}
    consolidate(second, tmp_path / "tp1", tok)
    a = load_file(str(tmp_path / "tp2" / "model.safetensors"))
    b = load_file(str(tmp_path / "tp1" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    # A restart at a size that is not a multiple of tp*pp: elastic [2, 3] with TP=2 starts 3 workers (they
    # fit), one replica trains on ranks 0-1 and rank 2 stays idle (it mirrors the reports, which are
    # collective). Two more steps with lr 0 leave the weights exactly as loaded.
    cfg3 = _cfg(train_shards, tmp_path / "run", steps=5, tp=2, min_workers=2, max_workers=3, cpus_per_worker=0.5,
                lr=0.0, name="reshard", dp_mode="fsdp")
    result3, _, _ = fit(cfg3)
    assert result3.error is None and result3.metrics["step"] == 5
    assert "3 workers is not a multiple of tp*pp = 2: 1 replicas train on ranks 0-1, ranks 2-2 stay idle" \
        in (tmp_path / "run" / "events.log").read_text()
    third = latest_complete(run_dir(cfg3))
    meta = read_meta(third)
    assert meta["layout"] == {"dp": 1, "pp": 1, "tp": 2} and meta["world_size"] == 2 and meta["step"] == 5
    assert sorted(p.name for p in third.glob("rank-*.safetensors")) == ["rank-00000.safetensors",
                                                                          "rank-00001.safetensors"]
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["dp"], r["global_batch"]) for r in recs[-2:]] == [(4, 1, 8), (5, 1, 8)]
    c = load_file(str(consolidate(third, tmp_path / "idle", tok) / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=0, atol=0, msg=k)


def test_interrupted_run_trains_exactly_the_uninterrupted_runs_weights(ray_cluster, train_shards, tmp_path, capsys,
                                                                       monkeypatch):
    """One replica, fp32 on CPU: a run killed mid-way, resumed, then continued with a larger --steps past a
    truncated checkpoint ends with the uninterrupted run's weights bit for bit (the data order,
    the optimizer, the schedule and the RNG all continue exactly). 20 steps of 8 examples cross the
    64-row shards twice."""
    common = dict(workers=1, checkpoint_every=3, keep_checkpoints=2)
    whole_cfg = _cfg(train_shards, tmp_path / "whole", steps=20, name="whole", **common)
    whole, _, tok = fit(whole_cfg)
    assert whole.error is None and whole.metrics["step"] == 20

    out = tmp_path / "pieces"
    _kill_a_worker_at(monkeypatch, 10)
    res, _, _ = fit(_cfg(train_shards, out, steps=14, name="pieces", **common))
    assert res.error is None and res.metrics["step"] == 14
    monkeypatch.delenv("PALI_STEP_HOOKS")
    assert (out / ".injected_failure").exists(), "the failure was not injected"
    latest = latest_complete(run_dir(_cfg(train_shards, out, name="pieces")))
    meta = read_meta(latest)
    assert meta["step"] == 14 and meta["data_state"]["cursor"] >= 1  # past the first shard
    weights = latest / "rank-00000.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated checkpoint
    capsys.readouterr()
    res, _, _ = fit(_cfg(train_shards, out, steps=20, name="pieces", **common))
    assert res.error is None and res.metrics["step"] == 20
    events = (out / "events.log").read_text()  # the skip is logged, with the reason
    assert "not resuming from checkpoint" in events and "truncated" in events and "using" in events

    a = consolidate(latest_complete(run_dir(whole_cfg)), tmp_path / "a", tok)
    b = consolidate(latest_complete(run_dir(_cfg(train_shards, out, name="pieces"))), tmp_path / "b", tok)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # A finished run continued with no more steps trains nothing and stops at once.
    lines = (out / "metrics.jsonl").read_text().count("\n")
    res, _, _ = fit(_cfg(train_shards, out, steps=20, name="pieces", **common))
    assert res.error is None and (out / "metrics.jsonl").read_text().count("\n") == lines
