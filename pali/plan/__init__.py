"""Sizing planner for PaLI runs: per-GPU memory, step time and communication of TP x PP x DP layouts.

`plan(PlanRequest(...))` ranks layouts, `rank_memory` sizes one rank, `serve_plan` sizes serving;
`pali.plan.measure` counts the same bytes on a live rank (the planner is tested against it).
"""

from pali.plan.hardware import GPUS, get_gpu
from pali.plan.memory import ActivationModel, Geometry, cut_stages, stage_activations, stage_params, total_params
from pali.plan.planner import LayoutPlan, PlanRequest, RankMemory, plan, rank_memory, recommend
from pali.plan.serve import ServePlan, serve_plan

__all__ = ["GPUS", "ActivationModel", "Geometry", "LayoutPlan", "PlanRequest", "RankMemory", "ServePlan",
           "cut_stages", "get_gpu", "plan", "rank_memory", "recommend", "serve_plan", "stage_activations",
           "stage_params", "total_params"]
