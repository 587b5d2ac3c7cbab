"""Sizing planner for PaLI runs: per-GPU memory, step time and communication of TP x PP x DP layouts.

`plan(PlanRequest(...))` ranks layouts, `rank_memory` sizes one rank, `serve_plan` sizes serving;
`pali.sizing.measure` counts the same bytes on a live rank (the planner is tested against it).
"""

from pali.sizing.hardware import GPUS, get_gpu
from pali.sizing.memory import ActivationModel, Geometry, cut_stages, stage_activations, stage_params, total_params
from pali.sizing.planner import LayoutPlan, PlanRequest, RankMemory, plan, rank_memory, recommend
from pali.sizing.serve import ServePlan, serve_plan

__all__ = ["GPUS", "ActivationModel", "Geometry", "LayoutPlan", "PlanRequest", "RankMemory", "ServePlan",
           "cut_stages", "get_gpu", "plan", "rank_memory", "recommend", "serve_plan", "stage_activations",
           "stage_params", "total_params"]
