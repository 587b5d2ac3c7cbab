"""Parallel training of PaLI: a DP x PP x TP grid, the TP plan, pipeline stages, and the engine.

    grid = Grid.init(dp=2, pp=1, tp=2)
    engine = build_engine(cfg, grid, full_state=None, seed=0, num_microbatches=2)
    res = engine.train_step(batch)   # grads = d(global mean token loss)/d(theta)

`pali/models/` stays plain PyTorch; everything here is applied from outside by module path.
"""

from pali.parallel.engine import Engine, StepResult, build_engine, compile_stage
from pali.parallel.grid import Grid
from pali.parallel.stages import STAGE_PARTS, build_stage_model, layout_specs
from pali.parallel.tp_plan import TP_PLAN, ShardSpec, apply_tp_plan, merge_shards, plan_style, slice_for

__all__ = ["STAGE_PARTS", "TP_PLAN", "Engine", "Grid", "ShardSpec", "StepResult", "apply_tp_plan",
           "build_engine", "build_stage_model", "compile_stage", "layout_specs", "merge_shards", "plan_style",
           "slice_for"]
