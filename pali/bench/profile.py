"""Where a step's CPU time goes (torch.profiler): the share spent in matrix multiplications and in the
optimizer, i.e. the work both sides of a comparison do identically with the same kernels."""

from __future__ import annotations

from collections.abc import Callable

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
            "aten::_scaled_dot_product_flash_attention_for_cpu")


def step_breakdown(fn: Callable[[], object], steps: int = 1) -> dict[str, float]:
    """Run `fn` `steps` times under the profiler; self-CPU seconds in total, in GEMM kernels, in the
    optimizer step, and the number of operator calls per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    gemm = sum(e.self_cpu_time_total for e in ev if e.key in GEMM_OPS)
    optim = sum(e.cpu_time_total for e in ev if e.key.startswith("Optimizer.step"))
    calls = sum(e.count for e in ev if e.key.startswith("aten::"))
    return {"self_cpu_s": total / 1e6 / steps, "gemm_s": gemm / 1e6 / steps, "optimizer_s": optim / 1e6 / steps,
            "gemm_frac": gemm / total if total else 0.0, "optimizer_frac": optim / total if total else 0.0,
            "aten_calls_per_step": calls / steps}


def speedup_ceiling(reference: dict[str, float]) -> float:
    """The largest speed-up over `reference` (a `step_breakdown`) that the same arithmetic allows.

    A faster implementation still runs the reference's matrix multiplications and optimizer update with
    the same kernels; only the rest (operator dispatch, copies, element-wise glue) can go. So even with
    zero overhead its time is at least gemm_s + optimizer_s, and the ratio below bounds any speed-up.
    """
    floor = reference["gemm_s"] + reference["optimizer_s"]
    return reference["self_cpu_s"] / floor if floor > 0 else float("inf")
