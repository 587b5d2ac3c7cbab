"""The proof: every parallel layout gives the loss and gradients of one process on the same global batch.

Real gloo process groups are spawned (2 and 4 ranks, OMP_NUM_THREADS=1) on the tiny preset; all layouts of
one world size share one spawn. Each rank writes its gradient shards; this process merges them back to full
shape with `merge_shards` and compares with plain `PaLI` on the concatenated batch (fp32, within 1e-4).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pali.factory import create_model
from pali.parallel import ShardSpec, layout_specs, merge_shards, slice_for
from tests.parallel.harness import global_batch, spawn
from tests.parallel.workers import Layout, run_layouts, tiny_cfg

pytestmark = pytest.mark.slow

ATOL = 1e-4
WORLD2 = [
    Layout("tp2", tp=2),
    Layout("pp2_1f1b_mb2", pp=2, microbatches=2, schedule="1f1b", repeat=True),
    Layout("pp2_gpipe", pp=2, schedule="gpipe"),
    Layout("dp2", dp=2, adam=True),
    Layout("dp2_mb2", dp=2, microbatches=2),
    Layout("dp2_fsdp_mb2", dp=2, microbatches=2, dp_mode="fsdp", adam=True),
    Layout("tp2_frozen_vision_ckpt", tp=2, microbatches=2, freeze_vision=True, activation_checkpointing=True),
]
WORLD4 = [
    Layout("tp2xpp2_mb2", pp=2, tp=2, microbatches=2, full_state=True),
    Layout("pp4_1f1b_mb4", pp=4, microbatches=4, full_state=True),
    Layout("dp2xtp2", dp=2, tp=2, adam=True, full_state=True),
    Layout("dp2xpp2_frozen", dp=2, pp=2, microbatches=2, schedule="gpipe", freeze_vision=True),
    Layout("dp2xtp2_fsdp", dp=2, tp=2, dp_mode="fsdp", full_state=True),
    Layout("dp2xpp2_fsdp_bf16_frozen", dp=2, pp=2, microbatches=2, dp_mode="fsdp", bf16=True,
           freeze_vision=True, repeat=True),
]
LAYOUTS = {lay.name: lay for lay in WORLD2 + WORLD4}
EXACT = [name for name, lay in LAYOUTS.items() if not lay.bf16]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Directory with every layout's per-rank outputs (two spawns: 2 and 4 ranks)."""
    out = tmp_path_factory.mktemp("parallel")
    spawn(run_layouts, 2, WORLD2, str(out))
    spawn(run_layouts, 4, WORLD4, str(out))
    return out


@pytest.fixture(scope="module")
def reference():
    """One process, the whole global batch: loss, per-example sums, gradients, grad norm, AdamW moments."""
    cfg = tiny_cfg()
    model = create_model(cfg, seed=0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    batch = global_batch(cfg)
    out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                image_mask=batch["image_mask"])
    out.loss.backward()
    labels = batch["labels"]
    ce = F.cross_entropy(out.logits.detach().flatten(0, 1), labels.flatten(), reduction="none")
    ce = ce.view_as(labels) * (labels != 0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    return {"loss": out.loss.item(), "num_tokens": int(out.num_tokens), "grads": grads, "init": init,
            "example_loss_sum": ce.sum(1), "example_tokens": (labels != 0).sum(1),
            "norm": math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values())),
            "exp_avg": {names[id(p)]: s["exp_avg"] for p, s in opt.state.items()},
            "exp_avg_sq": {names[id(p)]: s["exp_avg_sq"] for p, s in opt.state.items()}}


def _load(results, name: str) -> list[tuple[dict, dict[str, ShardSpec], dict[str, torch.Tensor]]]:
    """[(meta, specs, tensors)] for every rank of a layout."""
    out = []
    for r in range(LAYOUTS[name].world):
        base = os.path.join(results, name, f"rank{r}")
        meta = json.loads(open(base + ".json").read())
        specs = {n: ShardSpec.from_dict(d) for n, d in meta["specs"].items()}
        out.append((meta, specs, load_file(base + ".safetensors")))
    return out


def _merged(ranks, prefix: str) -> dict[str, torch.Tensor]:
    p = len(prefix) + 1
    return merge_shards([(specs, {k[p:]: v for k, v in t.items() if k.startswith(prefix + "/")})
                         for _, specs, t in ranks])


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float, what: str) -> None:
    assert set(got) == set(want), f"{what}: missing {sorted(set(want) - set(got))[:5]}, " \
                                  f"extra {sorted(set(got) - set(want))[:5]}"
    worst = max(((got[n] - want[n]).abs().max().item(), n) for n in want)
    assert worst[0] <= atol, f"{what}: {worst[1]} differs by {worst[0]:.3g} > {atol}"


@pytest.mark.parametrize("name", EXACT)
def test_loss_and_gradients_equal_one_process(results, reference, name):
    lay = LAYOUTS[name]
    ranks = _load(results, name)
    for meta, _, _ in ranks:
        assert meta["num_tokens"] == reference["num_tokens"]
        for key in ("loss", "eval_loss"):  # eval_step: the same forward without gradients
            assert abs(meta[key] - reference["loss"]) <= 1e-5 * reference["loss"], (key, meta[key], reference["loss"])
        assert meta["eval_left_grads_alone"]
    want = {n: g for n, g in reference["grads"].items()
            if not (lay.freeze_vision and n.startswith("vision_tower."))}
    _assert_close(_merged(ranks, "grad"), want, ATOL, f"{name} gradients")
    if lay.freeze_vision:
        assert not any(n.startswith("vision_tower.") for meta, _, _ in ranks for n in meta["trainable"])


@pytest.mark.parametrize("name", EXACT)
def test_per_example_losses_reach_every_rank(results, reference, name):
    ranks = _load(results, name)
    dp = LAYOUTS[name].dp
    by_replica: dict[int, list[float]] = {}
    for meta, _, _ in ranks:  # every TP/PP rank of a replica reports the same values
        got = by_replica.setdefault(meta["dp_rank"], meta["example_loss_sum"])
        assert got == pytest.approx(meta["example_loss_sum"], abs=1e-6)
        assert meta["example_tokens"] == reference["example_tokens"].chunk(dp)[meta["dp_rank"]].tolist()
    ex = torch.tensor([v for r in range(dp) for v in by_replica[r]])
    torch.testing.assert_close(ex, reference["example_loss_sum"], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("name", ["pp2_1f1b_mb2", "dp2xpp2_fsdp_bf16_frozen"])
def test_pipeline_steps_repeat_and_change_shape(results, name):
    """New prompt lengths get a new pipeline stage; the first shape's stage is reused with equal results."""
    for meta, _, _ in _load(results, name):
        assert math.isfinite(meta["short_loss"]) and meta["short_loss"] != meta["loss"]
        assert meta["repeat_loss"] == pytest.approx(meta["loss"], rel=1e-6)
        assert meta["repeat_same_grads"]


@pytest.mark.parametrize("name", ["tp2", "pp2_1f1b_mb2", "dp2", "dp2_fsdp_mb2", "tp2xpp2_mb2", "pp4_1f1b_mb4",
                                  "dp2xtp2", "dp2xtp2_fsdp"])
def test_global_grad_norm_and_clipping(results, reference, name):
    for meta, _, _ in _load(results, name):
        assert meta["norm"] == pytest.approx(reference["norm"], rel=1e-5)
        assert meta["norm_before_clip"] == pytest.approx(meta["norm"], rel=1e-9)
        assert meta["norm_after_clip"] == pytest.approx(0.5 * meta["norm"], rel=1e-5)


@pytest.mark.parametrize("name", ["dp2", "dp2_fsdp_mb2", "dp2xtp2"])
def test_adam_moments_merge_like_weights(results, reference, name):
    ranks = _load(results, name)
    _assert_close(_merged(ranks, "exp_avg"), reference["exp_avg"], 1e-5, f"{name} exp_avg")
    _assert_close(_merged(ranks, "exp_avg_sq"), reference["exp_avg_sq"], 1e-6, f"{name} exp_avg_sq")


def test_resharding_tp2xdp2_to_tp1_and_back_is_exact(results):
    cfg = tiny_cfg()
    ranks = _load(results, "dp2xtp2")
    for prefix in ("weight", "exp_avg"):
        full = _merged(ranks, prefix)
        # TP=2 shards -> full -> TP=1 (a single rank holds everything) is lossless
        assert all(torch.equal(a, full[n]) for n, a in slice_for(full, layout_specs(cfg)).items())
        # full -> each TP=2 rank's shard gives back exactly what that rank wrote
        for _, specs, t in ranks:
            mine = {k[len(prefix) + 1:]: v for k, v in t.items() if k.startswith(prefix + "/")}
            resliced = slice_for(full, {n: specs[n] for n in mine})
            assert all(torch.equal(resliced[n], mine[n]) for n in mine)
    # the other way: TP=1 (DP=2) shards -> full -> TP=2 x PP=2 shards -> full, bit for bit
    full1 = _merged(_load(results, "dp2"), "weight")
    shards = [(specs, slice_for(full1, specs))
              for specs in (layout_specs(cfg, pp=2, tp=2, pp_rank=s, tp_rank=r) for s in (0, 1) for r in (0, 1))]
    back = merge_shards(shards)
    assert set(back) == set(full1) and all(torch.equal(back[n], full1[n]) for n in full1)


@pytest.mark.parametrize("name", ["tp2xpp2_mb2", "pp4_1f1b_mb4", "dp2xtp2", "dp2xtp2_fsdp"])
def test_full_state_dict_gathers_on_rank0(results, reference, name):
    ranks = _load(results, name)
    full = {k[5:]: v for k, v in ranks[0][2].items() if k.startswith("full/")}
    assert set(full) == set(reference["init"])
    assert all(torch.equal(full[n], reference["init"][n]) for n in full), "gathered weights differ from the init"
    assert all(meta["full_state_is_none"] for meta, _, _ in ranks[1:])


def test_bf16_autocast_pipeline_with_fsdp_matches_one_process_bf16(results, reference):
    """bf16 autocast (PP=2 x FSDP DP=2, frozen vision) reproduces one process under the same autocast.

    (bf16 itself moves the gradients of this random tiny model to cosine ~0.97 of fp32, in one process too.)
    """
    cfg = tiny_cfg(freeze_vision=True)
    model = create_model(cfg, seed=0)
    batch = global_batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                    image_mask=batch["image_mask"])
    out.loss.backward()
    ranks = _load(results, "dp2xpp2_fsdp_bf16_frozen")
    assert all(abs(m["loss"] - out.loss.item()) < 1e-3 * out.loss.item() for m, _, _ in ranks)
    got = _merged(ranks, "grad")
    want = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(want)
    a = torch.cat([got[n].flatten() for n in sorted(got)])
    b = torch.cat([want[n].grad.flatten() for n in sorted(got)])
    assert torch.isfinite(a).all() and F.cosine_similarity(a, b, dim=0) > 0.995
