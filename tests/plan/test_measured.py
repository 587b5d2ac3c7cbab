"""The planner's per-rank memory against real training steps on CPU (gloo, spawned ranks).

Each rank of each layout trains two steps with `pali.parallel.build_engine` and AdamW; the worker counts
the bytes of its parameters, gradients and optimizer state, and the peak of the tensors autograd saves
for backward (`pali.plan.measure`). The planner (`rank_memory`, fp32, CPU attention kernels) must
predict every rank's state + activations within 15 %, and each part separately. Layouts cover TP 1/2,
PP 1/2 (1F1B), DDP and FSDP2 (sharded optimizer), with and without activation checkpointing, on 2 ranks.
"""

from __future__ import annotations

import json
import time

import pytest

from pali.config import get_preset
from pali.plan.memory import Geometry
from pali.plan.planner import rank_memory
from tests.parallel.harness import spawn
from tests.plan.workers import measure_layouts

WORLD = 2
B, PROMPT, TARGET = 4, 12, 10  # global batch; prompt and target tokens per example

LAYOUTS = [
    # name, tp, pp, dp, dp_mode, micro-batches, activation checkpointing
    ("dp2_ddp", 1, 1, 2, "ddp", 1, False),
    ("dp2_fsdp_ckpt", 1, 1, 2, "fsdp", 2, True),
    ("tp2", 2, 1, 1, "ddp", 1, False),
    ("tp2_ckpt", 2, 1, 1, "ddp", 2, True),
    ("pp2_1f1b", 1, 2, 1, "ddp", 2, False),
    ("pp2_1f1b_ckpt", 1, 2, 1, "ddp", 4, True),
]


def model_config():
    """`tiny` scaled up so each part (embeddings, blocks, activations) is a sizeable share."""
    return get_preset("tiny").with_overrides(
        freeze_vision=True, text__d_model=192, text__d_ff=384, text__num_heads=4, text__d_kv=48,
        text__vocab_size=4096, text__num_layers=3, text__num_decoder_layers=2)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """{(layout name, rank): measured bytes} from one spawn of WORLD gloo ranks running every layout."""
    cfg = model_config()
    out = tmp_path_factory.mktemp("measured")
    layouts = [dict(name=n, tp=tp, pp=pp, dp=dp, dp_mode=mode, microbatches=m, checkpointing=ck)
               for n, tp, pp, dp, mode, m, ck in LAYOUTS]
    t0 = time.time()
    spawn(measure_layouts, WORLD, cfg.to_json(), layouts, {"b": B, "s": PROMPT, "t": TARGET}, str(out))
    print(f"measured {len(LAYOUTS)} layouts on {WORLD} ranks in {time.time() - t0:.1f}s")
    rows = {}
    for r in range(WORLD):
        for row in json.loads((out / f"rank{r}.json").read_text()):
            rows[(row["name"], r)] = row
    return cfg, rows


def predicted(cfg, name: str, pp_rank: int):
    _, tp, pp, dp, mode, m, ck = next(lay for lay in LAYOUTS if lay[0] == name)
    mb = B // dp // m
    return rank_memory(cfg, tp, pp, dp, pp_rank, Geometry(PROMPT, TARGET), mb, m, dp_mode=mode,
                       checkpointing=ck, precision="fp32", fused_attention=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", [lay[0] for lay in LAYOUTS])
def test_planner_matches_measured_memory_per_rank(measured, name):
    cfg, rows = measured
    for rank in range(WORLD):
        got = rows[(name, rank)]
        want = predicted(cfg, name, got["pp_rank"])
        measured_total = got["params"] + got["grads"] + got["optimizer"] + got["activations"]
        predicted_total = want.state + want.activations
        msg = (f"{name} rank {rank}: measured params {got['params']} grads {got['grads']} optim "
               f"{got['optimizer']} act {got['activations']}; predicted params {want.params:.0f} grads "
               f"{want.grads:.0f} optim {want.optimizer:.0f} act {want.activations:.0f}")
        assert predicted_total == pytest.approx(measured_total, rel=0.15), msg
        for part in ("params", "grads", "optimizer", "activations"):
            assert getattr(want, part) == pytest.approx(got[part], rel=0.15), f"{part}: {msg}"


@pytest.mark.slow
def test_checkpointing_and_sharding_change_what_the_planner_says(measured):
    """The measured effects the planner predicts actually happen: checkpointing cuts saved activations,
    FSDP cuts state bytes by about dp, and 1F1B's first stage holds more micro-batches than the last."""
    _, rows = measured
    assert rows[("dp2_fsdp_ckpt", 0)]["optimizer"] < rows[("dp2_ddp", 0)]["optimizer"] * 0.6
    for name in ("tp2", "pp2_1f1b"):
        for rank in range(WORLD):
            assert rows[(name + "_ckpt", rank)]["activations"] < rows[(name, rank)]["activations"] / 2
    assert rows[("pp2_1f1b", 0)]["activations"] > rows[("pp2_1f1b", 1)]["activations"]
    assert all(r["loss"] == pytest.approx(rows[("dp2_ddp", 0)]["loss"], rel=1e-3) for r in rows.values())
