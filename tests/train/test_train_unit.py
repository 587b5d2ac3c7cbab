"""Unit tests of the training pieces that need no Ray: schedule, config, data cursor, sharded checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from pali.parallel.tp_plan import ShardSpec, slice_for
from pali.train import sharded_checkpoint as ck
from pali.train.config import TrainConfig
from pali.train.data_order import shard_at, shard_order
from pali.train.optim import build_optimizer, lr_factor


def test_rsqrt_schedule_warms_up_then_decays_as_inverse_sqrt():
    cfg = TrainConfig(warmup_steps=10, schedule="rsqrt")
    f = [lr_factor(s, cfg) for s in range(40)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[39] == pytest.approx((10 / 40) ** 0.5)
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))


def test_cosine_schedule_ends_at_min_ratio():
    cfg = TrainConfig(warmup_steps=5, schedule="cosine", steps=50, min_lr_ratio=0.1)
    assert lr_factor(4, cfg) == pytest.approx(1.0)
    assert lr_factor(50, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_vision_tower_trains_at_its_own_lr_through_the_schedule(optimizer):
    """Vision tower + projector at lr * vision_lr_mult, everything else at lr, scaled alike by the schedule;
    AdamW still spares biases and norms from weight decay."""
    import pali

    model = pali.create_model("tiny", seed=0)
    cfg = TrainConfig(lr=1e-3, vision_lr_mult=0.25, warmup_steps=4, optimizer=optimizer)
    opt = build_optimizer(model.named_parameters(), cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    names = {id(p): n for n, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    for _ in range(6):
        opt.step()
        sched.step()
    for g in opt.param_groups:
        vision = {names[id(p)].startswith(("vision_tower.", "projector.")) for p in g["params"]}
        assert len(vision) == 1, "a group mixes vision and text parameters"
        want = 1e-3 * (0.25 if vision.pop() else 1.0) * lr_factor(6, cfg)
        assert g["lr"] == pytest.approx(want)
        if optimizer == "adamw":
            assert (g["weight_decay"] > 0) == all(p.dim() >= 2 for p in g["params"])


@pytest.mark.parametrize("kw, msg", [
    ({"vision_lr_mult": 0.0}, "vision_lr_mult must be > 0"),
    ({"workers": 3, "tp": 2}, r"not a multiple of tp\*pp"),
    ({"workers": 4, "global_batch": 30}, "does not split evenly"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"min_workers": 4, "max_workers": 2}, "min_workers 4 > max_workers 2"),
])
def test_config_errors_name_the_problem(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw).validate()


def test_microbatches_keep_global_batch_constant_when_dp_changes():
    cfg = TrainConfig(global_batch=32, micro_batch=8)
    for dp in (1, 2, 4):
        per_rank, n = cfg.microbatches(dp)
        assert per_rank * dp == 32 and per_rank % n == 0


def test_shard_cursor_crosses_epochs_in_seeded_order():
    shards = [f"s{i}" for i in range(5)]
    first = [shard_at(shards, g, seed=3) for g in range(10)]
    assert sorted(first[:5]) == shards and sorted(first[5:]) == shards
    assert first[:5] == shard_order(shards, 0, 3) and first[5:] == shard_order(shards, 1, 3)
    assert shard_order(shards, 0, 3) != shard_order(shards, 1, 3)  # each epoch has its own order


def _write_tp2(tmp_path, full: dict[str, torch.Tensor], step: int):
    specs_by_rank = []
    for r in range(2):
        specs = {"w": ShardSpec(tuple(full["w"].shape), 0, r, 2), "b": ShardSpec(tuple(full["b"].shape), None)}
        local = slice_for(full, specs)
        params = [(n, torch.nn.Parameter(t.clone())) for n, t in local.items()]
        opt = torch.optim.AdamW([p for _, p in params], lr=0.1)
        for _, p in params:
            p.grad = torch.ones_like(p) * (1 + r)
        opt.step()
        meta = {"step": step, "world_size": 2, "data_position": 3} if r == 0 else None
        ck.save_shard(tmp_path, r, {"dp": 1, "pp": 1, "tp": 2}, specs, local, opt, params, meta)
        specs_by_rank.append((specs, opt, params))
    return specs_by_rank


def test_sharded_checkpoint_merges_and_reslices_for_another_layout(tmp_path):
    full = {"w": torch.randn(6, 4), "b": torch.randn(4)}
    written = _write_tp2(tmp_path, full, step=5)
    assert ck.is_complete(tmp_path)
    got = ck.load_full(tmp_path)
    assert got["meta"]["step"] == 5 and got["meta"]["data_position"] == 3
    torch.testing.assert_close(got["model"]["w"], full["w"], rtol=0, atol=0)
    # Adam moments merge like the weights: rank r's exp_avg chunk sits at rows [3r, 3r+3).
    for r, (_, opt, params) in enumerate(written):
        p = dict(params)["w"]
        torch.testing.assert_close(got["optim"]["w"]["exp_avg"][3 * r:3 * r + 3], opt.state[p]["exp_avg"])
    # Re-slice for TP=1: one rank holding everything, optimizer state restored exactly.
    specs1 = {"w": ShardSpec((6, 4), None), "b": ShardSpec((4,), None)}
    params = [(n, torch.nn.Parameter(t.clone())) for n, t in slice_for(got["model"], specs1).items()]
    cfg = TrainConfig(optimizer="adamw")
    opt = build_optimizer(params, cfg)
    n = ck.restore_optimizer(opt, params, got["optim"], got["optim_scalars"], specs1, slice_for)
    assert n == 4  # exp_avg and exp_avg_sq of w and b
    torch.testing.assert_close(opt.state[dict(params)["w"]]["exp_avg"], got["optim"]["w"]["exp_avg"])


def test_half_written_checkpoint_is_never_latest(tmp_path):
    full = {"w": torch.randn(6, 4), "b": torch.randn(4)}
    good, bad = tmp_path / "run" / "checkpoint_a", tmp_path / "run" / "checkpoint_b"
    _write_tp2(good, full, step=5)
    _write_tp2(bad, full, step=10)
    (bad / "rank-00001.safetensors").unlink()  # rank 1 never finished writing
    assert not ck.is_complete(bad)
    assert ck.latest_complete(tmp_path / "run") == good
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ck.load_full(bad)
    json.loads((good / "meta.json").read_text())


def test_gpu_workers_get_gloo_for_cpu_collectives_next_to_nccl():
    """The loop all-reduces CPU tensors (metric sums, data position); under nccl alone that raised "No
    backend type associated with device type cpu" on a GPU. Ray Train must get the mixed backend."""
    from ray.train.torch.config import _is_backend_nccl

    from pali.train.resources import torch_backend

    assert torch_backend(False) == "gloo"
    backend = torch_backend(True)
    assert dict(item.split(":") for item in backend.split(",")) == {"cpu": "gloo", "cuda": "nccl"}
    assert _is_backend_nccl(backend)  # Ray still applies its nccl settings (async error handling)


def test_unmet_resources_name_what_a_local_cluster_lacks():
    """`python -m jobs.pretrain --use-gpu` on a local Ray without enough GPUs must say so, not wait forever."""
    from pali.train.resources import unmet_resources

    cpu_box = {"CPU": 8.0}
    assert unmet_resources(TrainConfig(workers=2), cpu_box) is None
    msg = unmet_resources(TrainConfig(workers=2, use_gpu=True), cpu_box)
    assert "2 workers x 1 GPU need 2 GPU but this Ray cluster has 0" in msg and "drop --use-gpu" in msg
    msg = unmet_resources(TrainConfig(workers=2, use_gpu=True), {"CPU": 16.0, "GPU": 1.0})
    assert "has 1" in msg and "--workers 1" in msg
    assert unmet_resources(TrainConfig(workers=4, cpus_per_worker=3.0), cpu_box).startswith("4 workers x 3 CPU")
    # elastic: the smallest group decides
    assert unmet_resources(TrainConfig(min_workers=1, max_workers=4, use_gpu=True), {"CPU": 8, "GPU": 1}) is None


def test_compile_flag_reaches_the_config_and_round_trips():
    """`--compile` sets TrainConfig.compile (off by default), which the workers get through to_dict/from_dict."""
    from jobs.pretrain import parse_args

    assert parse_args([])[0].compile is False
    cfg = parse_args(["--compile"])[0]
    assert cfg.compile is True and TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).compile is True


def test_pretrain_flags_are_derived_from_train_config_fields():
    """A new TrainConfig field is a new flag, documented by its docstring; no flag copies a default by hand."""
    import dataclasses

    from jobs.pretrain import build_parser, parse_args
    from pali.cli import field_docs
    from pali.train.config import TrainConfig

    actions = {a.dest: a for a in build_parser()._actions}
    docs = field_docs(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_overrides":
            continue
        assert f.name in actions, f"TrainConfig.{f.name} has no flag"
        assert actions[f.name].help == docs[f.name] and docs[f.name], f.name
    assert parse_args([])[0] == TrainConfig()
    cfg, _ = parse_args(["--min-lr-ratio", "0.2", "--no-trim-padding", "--task-weights", '{"ocr": 1}',
                         "--data", "a", "b", "--schedule", "cosine", "--keep-checkpoints", "5", "--image-size", "64"])
    assert (cfg.min_lr_ratio, cfg.trim_padding, cfg.task_weights, cfg.data, cfg.schedule, cfg.keep_checkpoints) == \
        (0.2, False, {"ocr": 1}, ["a", "b"], "cosine", 5)
    assert cfg.model_overrides == {"vision__image_size": 64}
    with pytest.raises(SystemExit):
        parse_args(["--task-weights", "[1, 2]"])  # a JSON object is expected


def test_elastic_ranges_that_cannot_keep_the_global_batch_are_refused_naming_the_sizes():
    """Ray Train may start any size in [min, max]; each must train the exact global batch, or the range is
    refused before anything starts."""
    with pytest.raises(ValueError, match=r"global batch 32 .* world sizes \[3\] in \[1, 4\]"):
        TrainConfig(global_batch=32, min_workers=1, max_workers=4).validate()  # dp = 3 cannot split 32
    with pytest.raises(ValueError, match=r"global batch 32 .* world sizes \[3\]"):
        TrainConfig(global_batch=32, workers=3).validate()
    TrainConfig(global_batch=24, min_workers=1, max_workers=4).validate()  # 24 splits over 1, 2, 3 and 4
    with pytest.raises(ValueError, match=r"global batch 30 .* world sizes \[8\] in \[4, 9\]"):
        TrainConfig(tp=2, global_batch=30, min_workers=4, max_workers=9).validate()  # dp 2 ok, dp 4 (8, 9) not
    # Sizes between multiples of tp*pp train their whole replicas (the rest idle): [3, 5] means dp 1 or 2.
    TrainConfig(tp=2, min_workers=3, max_workers=5).validate()
    with pytest.raises(ValueError, match=r"global batch 9 .* world sizes \[4\] in \[3, 5\]"):
        TrainConfig(tp=2, global_batch=9, min_workers=3, max_workers=5).validate()
    with pytest.raises(ValueError, match=r"starts below tp\*pp = 4: no whole model replica fits in 3"):
        TrainConfig(tp=2, pp=2, min_workers=3, max_workers=8).validate()
    TrainConfig(tp=2, min_workers=4, max_workers=4).validate()
    assert TrainConfig(min_workers=2).worker_range() == (2, 2) and TrainConfig(max_workers=3).worker_range() == (1, 3)


def test_object_store_paths_stay_uris_and_never_become_local_s3_folders(tmp_path, monkeypatch):
    from pali.train.trainer import run_dir, storage_path

    monkeypatch.setenv("PALI_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrainConfig(output_dir="s3://bucket/out", init_from="gs://b/ckpt", name="r")
    cfg.validate()
    assert storage_path(cfg) == "s3://bucket/out/ray" and run_dir(cfg) == "s3://bucket/out/ray/r"
    local = cfg.local_output_dir()  # the driver's mirror is under the cache, never a folder named "s3:"
    assert local.is_relative_to(tmp_path / "cache") and "s3:" not in str(local)
    assert TrainConfig(output_dir="s3://other/out", name="r").local_output_dir() != local
    with pytest.raises(ValueError, match="names no bucket"):
        TrainConfig(output_dir="s3://").validate()
