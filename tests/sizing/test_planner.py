"""The planner's model against the code it models (parameter counts, FLOPs, saved activations), and the CLI."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from jobs.plan import main
from jobs.pretrain import parse_args as parse_pretrain_args
from pali.config import get_preset
from pali.factory import create_model
from pali.models.pali import flops_per_example, hardware_flops_per_example
from pali.parallel.engine import _checkpoint_blocks
from pali.parallel.stages import build_stage_model
from pali.sizing import (
    ActivationModel,
    Geometry,
    PlanRequest,
    cut_stages,
    get_gpu,
    plan,
    stage_activations,
    stage_params,
)
from pali.sizing.cost import stage_flops
from pali.sizing.measure import SavedActivationMeter


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("frozen", [True, False])
def test_parameter_counts_equal_the_stage_models_pali_parallel_builds(preset, frozen):
    cfg = get_preset(preset).with_overrides(freeze_vision=frozen)
    for pp in (1, 2, 3, 4):
        for tp in (1, 2):
            for pp_rank, stage in enumerate(cut_stages(cfg, pp)):
                model, _ = build_stage_model(cfg, pp, tp, pp_rank, tp_rank=tp - 1)
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                frozen_n = sum(p.numel() for p in model.parameters() if not p.requires_grad)
                got = stage_params(cfg, stage, tp)
                assert (got.trainable, got.frozen) == (trainable, frozen_n), (preset, pp, tp, pp_rank)


@pytest.mark.parametrize("preset", ["tiny", "pali-3b", "pali-17b"])
def test_stage_flops_sum_to_flops_per_example(preset):
    geo = Geometry(24, 16)
    for frozen in (True, False):
        cfg = get_preset(preset).with_overrides(freeze_vision=frozen)
        want = flops_per_example(cfg, 24, 16)
        for pp in (1, 2, 4):
            parts = [stage_flops(cfg, st, geo, checkpointing=False) for st in cut_stages(cfg, pp)]
            assert sum(p.model for p in parts) == pytest.approx(want, rel=1e-12)
            # without recomputation the hardware runs exactly the model FLOPs (a frozen tower forward only)
            assert sum(p.executed for p in parts) == pytest.approx(want, rel=1e-12)
            for ck, head in ((True, False), (False, True), (True, True)):
                got = sum(stage_flops(cfg, st, geo, ck, head).executed for st in cut_stages(cfg, pp))
                assert got == pytest.approx(hardware_flops_per_example(cfg, 24, 16, ck, head), rel=1e-12)
                assert got > want


@pytest.mark.parametrize("frozen,ckpt", [(True, False), (True, True), (False, False), (False, True)])
def test_saved_activations_match_autograd_in_one_process(frozen, ckpt):
    """The activation formula against the bytes autograd really keeps (fp32, CPU kernels)."""
    torch.manual_seed(0)
    cfg = get_preset("tiny").with_overrides(freeze_vision=frozen)
    model = create_model(cfg)
    if ckpt:
        _checkpoint_blocks(model)
    b, s, t = 3, 9, 6
    pixels = torch.randn(b, 3, cfg.vision.image_size, cfg.vision.image_size)
    ids, labels = torch.randint(3, 100, (b, s)), torch.randint(3, 100, (b, t))
    meter = SavedActivationMeter()
    with meter:
        out = model(pixel_values=pixels, input_ids=ids, labels=labels)
        out.loss.backward()
    want, _ = stage_activations(cfg, cut_stages(cfg, 1)[0], 1, Geometry(s, t),
                                ActivationModel(act_bytes=4, fused_attention=False), ckpt, mb=b)
    assert want == pytest.approx(meter.peak, rel=0.02)
    assert meter.live == 0


def test_plan_17b_on_64_h200s_recommends_a_fitting_runnable_layout(capsys):
    rc = main(["--preset", "pali-17b", "--nodes", "8", "--gpus-per-node", "8", "--gpu", "h200",
               "--global-batch", "4096", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    best, layouts = out["recommended"], out["layouts"]
    assert best["fits"] and best["runnable"] and best["memory"]["total"] <= 141 * 0.9
    assert best["tp"] * best["pp"] * best["dp"] == 64 and 64 % best["tp"] == 0 and 8 % best["tp"] == 0
    fitting = [x for x in layouts if x["fits"] and x["runnable"]]
    assert best["step_time_s"] == min(x["step_time_s"] for x in fitting)
    assert "ray job submit --working-dir . -- python -m jobs.pretrain --preset pali-17b" in out["command"]
    assert "--workers 64 " in out["command"] and "--use-gpu" in out["command"]
    assert any(not x["runnable"] for x in layouts)  # pp=4 / zero1 are modelled, marked as such
    # the printed command is one jobs.pretrain accepts, with the recommended layout
    cfg, _ = parse_pretrain_args(shlex.split(out["command"].split("python -m jobs.pretrain", 1)[1]))
    assert (cfg.tp, cfg.pp, cfg.workers, cfg.dp_mode, cfg.activation_checkpointing, cfg.use_gpu) == (
        best["tp"], best["pp"], 64, best["dp_mode"], best["checkpointing"], True)
    assert cfg.microbatches(best["dp"]) == (4096 // best["dp"], best["num_microbatches"])
    for x in layouts:
        assert 64 % x["tp"] == 0 and 16 % x["tp"] == 0  # text and vision heads divide by tp
        m = x["memory"]
        assert m["total"] == pytest.approx(m["state"] + m["activations"] + m["pipeline_buffers"] + m["transient"])
        assert m["activations_ckpt"] < m["activations_no_ckpt"]


def test_sharding_and_more_gpus_move_the_numbers_the_right_way():
    cfg = get_preset("pali-3b")
    req = PlanRequest(cfg, get_gpu("h100"), nodes=4, gpus_per_node=8, global_batch=1024)
    by = {(p.tp, p.pp, p.dp_mode, p.checkpointing): p for p in plan(req)}
    ddp, fsdp, zero1 = (by[(1, 1, m, False)] for m in ("ddp", "fsdp", "zero1"))
    assert fsdp.memory["state"] < zero1.memory["state"] < ddp.memory["state"]
    assert fsdp.comm_gb["dp"] > ddp.comm_gb["dp"] * 1.2  # all-gathers on top of the reduce-scatter
    assert by[(2, 1, "ddp", False)].comm_gb["tp"] > 0 == ddp.comm_gb["tp"]
    big = plan(PlanRequest(cfg, get_gpu("h100"), nodes=8, gpus_per_node=8, global_batch=1024))
    assert big[0].examples_per_s > plan(req)[0].examples_per_s


def test_human_table_and_serve_mode(capsys):
    assert main(["--preset", "pali-3b", "--nodes", "4", "--gpu", "h100", "--global-batch", "1024", "--top", "5"]) == 0
    text = capsys.readouterr().out
    assert "TPxPPxDP" in text and "recommended: TP=" in text and "ray job submit" in text
    assert main(["--preset", "pali-17b", "--gpu", "h100", "--serve", "--kv-len", "128", "--json"]) == 0
    short = json.loads(capsys.readouterr().out)
    assert main(["--preset", "pali-17b", "--gpu", "h100", "--serve", "--kv-len", "1024", "--json"]) == 0
    long = json.loads(capsys.readouterr().out)
    assert 0 < long["max_batch_one_replica"] < short["max_batch_one_replica"]
    assert short["weights_gb"] == pytest.approx(2 * short["params"] / 1e9)
    assert main(["--preset", "pali-3b", "--gpu", "a100", "--serve", "--batch", "4"]) == 0
    assert "replicas per GPU at batch 4" in capsys.readouterr().out


def test_nothing_fits_and_bad_input_are_reported(capsys):
    assert main(["--preset", "pali-17b", "--nodes", "1", "--gpus-per-node", "1", "--gpu", "a100",
                 "--global-batch", "64"]) == 1
    assert "no layout fits" in capsys.readouterr().out
    assert main(["--preset", "pali-99b"]) == 2
    assert "unknown preset 'pali-99b'" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--mfu", "1.5"]) == 2
    assert "mfu=1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--seq", "32"])
    assert "expected PROMPT,TARGET" in capsys.readouterr().err
