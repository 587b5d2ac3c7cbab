"""The planner's per-rank memory against real training steps on CPU (gloo, spawned ranks).

Each rank of each layout trains two steps with `pali.parallel.build_engine` and AdamW; the worker counts
the bytes of its parameters, gradients and optimizer state, and the peak of the tensors autograd saves
for backward (`pali.sizing.measure`). The planner (`rank_memory`, fp32, CPU attention kernels) must
predict every rank's state + activations within 15 %, and each part separately (plus the unsharded
gradients FSDP2 accumulates between micro-batches). Layouts cover TP 1/2,
PP 1/2 (1F1B), DDP and FSDP2 (sharded optimizer), with and without activation checkpointing, on 2 ranks,
and a 4-stage pipeline (`pali.parallel.deep`) on 4 ranks.
"""

from __future__ import annotations

import json
import time

import pytest

from pali.config import get_preset
from pali.sizing.memory import Geometry
from pali.sizing.planner import rank_memory
from tests.parallel.harness import spawn
from tests.sizing.workers import measure_layouts

B, PROMPT, TARGET = 4, 12, 10  # global batch; prompt and target tokens per example

LAYOUTS = [
    # name, tp, pp, dp, dp_mode, micro-batches, activation checkpointing  (2 ranks)
    ("dp2_ddp", 1, 1, 2, "ddp", 1, False),
    ("dp2_fsdp_ckpt", 1, 1, 2, "fsdp", 2, True),
    ("tp2", 2, 1, 1, "ddp", 1, False),
    ("tp2_ckpt", 2, 1, 1, "ddp", 2, True),
    ("pp2_1f1b", 1, 2, 1, "ddp", 2, False),
    ("pp2_1f1b_ckpt", 1, 2, 1, "ddp", 4, True),
]
DEEP_LAYOUTS = [  # 4 ranks: a deep pipeline (pali.parallel.deep), 2 encoder-side + 2 decoder-side stages
    ("pp4_1f1b", 1, 4, 1, "ddp", 4, False),
    ("pp4_1f1b_ckpt", 1, 4, 1, "ddp", 4, True),
]


def model_config():
    """`tiny` scaled up so each part (embeddings, blocks, activations) is a sizeable share."""
    return get_preset("tiny").with_overrides(
        freeze_vision=True, text__d_model=192, text__d_ff=384, text__num_heads=4, text__d_kv=48,
        text__vocab_size=4096, text__num_layers=3, text__num_decoder_layers=2)


def _measure(tmp_path_factory, layouts: list[tuple], world: int) -> dict:
    """{(layout name, rank): measured bytes} from one spawn of `world` gloo ranks running every layout."""
    out = tmp_path_factory.mktemp("measured")
    specs = [dict(name=n, tp=tp, pp=pp, dp=dp, dp_mode=mode, microbatches=m, checkpointing=ck)
             for n, tp, pp, dp, mode, m, ck in layouts]
    t0 = time.time()
    spawn(measure_layouts, world, model_config().to_json(), specs, {"b": B, "s": PROMPT, "t": TARGET}, str(out))
    print(f"measured {len(layouts)} layouts on {world} ranks in {time.time() - t0:.1f}s")
    rows = {}
    for r in range(world):
        for row in json.loads((out / f"rank{r}.json").read_text()):
            rows[(row["name"], r)] = row
    return rows


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Rows of the 2-rank layouts."""
    return _measure(tmp_path_factory, LAYOUTS, 2)


@pytest.fixture(scope="module")
def measured_deep(tmp_path_factory):
    """Rows of the 4-rank deep-pipeline layouts."""
    return _measure(tmp_path_factory, DEEP_LAYOUTS, 4)


def predicted(cfg, name: str, pp_rank: int):
    _, tp, pp, dp, mode, m, ck = next(lay for lay in LAYOUTS + DEEP_LAYOUTS if lay[0] == name)
    mb = B // dp // m
    return rank_memory(cfg, tp, pp, dp, pp_rank, Geometry(PROMPT, TARGET), mb, m, dp_mode=mode,
                       checkpointing=ck, precision="fp32", fused_attention=False)


def _check(rows: dict, name: str) -> None:
    cfg = model_config()
    ranks = sorted(r for n, r in rows if n == name)
    assert ranks, f"no measurement for {name}"
    for rank in ranks:
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
        # FSDP2 accumulates unsharded gradients between micro-batches (0 when it does not)
        assert want.fsdp_unsharded_grads == pytest.approx(got["fsdp_unsharded_grads"], rel=0.15), msg


@pytest.mark.slow
@pytest.mark.parametrize("name", [lay[0] for lay in LAYOUTS])
def test_planner_matches_measured_memory_per_rank(measured, name):
    _check(measured, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [lay[0] for lay in DEEP_LAYOUTS])
def test_planner_matches_measured_memory_of_a_deep_pipeline(measured_deep, name):
    _check(measured_deep, name)


@pytest.mark.slow
def test_checkpointing_and_sharding_change_what_the_planner_says(measured):
    """The measured effects the planner predicts actually happen: checkpointing cuts saved activations,
    FSDP cuts state bytes by about dp, and 1F1B's first stage holds more micro-batches than the last."""
    rows = measured
    assert rows[("dp2_fsdp_ckpt", 0)]["optimizer"] < rows[("dp2_ddp", 0)]["optimizer"] * 0.6
    # ...but between micro-batches FSDP2 holds unsharded gradients (about dp times its shard)
    assert rows[("dp2_fsdp_ckpt", 0)]["fsdp_unsharded_grads"] > rows[("dp2_fsdp_ckpt", 0)]["grads"] * 1.5
    for name in ("tp2", "pp2_1f1b"):
        for rank in range(2):
            assert rows[(name + "_ckpt", rank)]["activations"] < rows[(name, rank)]["activations"] / 2
    assert rows[("pp2_1f1b", 0)]["activations"] > rows[("pp2_1f1b", 1)]["activations"]
    assert all(r["loss"] == pytest.approx(rows[("dp2_ddp", 0)]["loss"], rel=1e-3) for r in rows.values())
