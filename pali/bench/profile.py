"""Where a step's CPU time goes (torch.profiler): the share spent in matrix multiplications and in the
optimizer, i.e. the work both sides of a comparison do identically with the same kernels.

`kernel_floor` measures that floor directly: it records every matrix-product, fused-attention,
convolution and fused-optimizer kernel call of one step (operator, shapes, strides, arguments) and times
those calls alone, replayed on tensors of the same layout. A step can be no faster than its own floor, so
`reference wall time / reference floor` bounds the speed-up any implementation running the same
arithmetic could reach over the reference.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from pali.bench.common import median

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


# aten operators (overload packets) whose work is the step's irreducible arithmetic.
FLOOR_OPS = frozenset({
    "mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward", "mkldnn_convolution",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_fused_adamw_", "_fused_adam_"})


@dataclass(frozen=True)
class _Spec:
    storage: int
    """data_ptr of the tensor's storage during the recorded call (tensors sharing memory share it again)."""
    nbytes: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def _spec(x):
    if not isinstance(x, torch.Tensor):
        return x
    st = x.untyped_storage()
    return _Spec(st.data_ptr(), st.nbytes(), x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype)


def materialize(calls: list[tuple]) -> list[tuple]:
    """The recorded calls with their tensors rebuilt: one random buffer per recorded storage, each tensor a
    view of it at the recorded offset, shape and strides, so the replay touches memory as the step did
    (weights reused across calls stay one buffer, and stay hot in cache as they were)."""
    sizes: dict[int, int] = {}
    for _, a, k in calls:
        for x in tree_flatten((a, k))[0]:
            if isinstance(x, _Spec):
                sizes[x.storage] = max(sizes.get(x.storage, 0), x.nbytes)
    buffers = {}
    for ptr, n in sizes.items():
        b = torch.empty(-(-n // 4), dtype=torch.float32)
        b.uniform_(0.0, 1.0)
        buffers[ptr] = b.untyped_storage()

    def make(x):
        if not isinstance(x, _Spec):
            return x
        return torch.empty(0, dtype=x.dtype).set_(buffers[x.storage], x.offset, x.shape, x.stride)
    return [(f, tree_map(make, a), tree_map(make, k)) for f, a, k in calls]


class KernelRecorder(TorchDispatchMode):
    """Records the floor operators dispatched while active (forward, backward and optimizer alike)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in FLOOR_OPS:
            self.calls.append((func, tree_map(_spec, args), tree_map(_spec, kwargs)))
        elif func.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd):
            # Under inference_mode composite operators (linear, matmul, attention) reach the mode whole:
            # run their decomposition with the mode active again, so the kernels inside get recorded.
            with self:
                return func.decompose(*args, **kwargs)
        return func(*args, **kwargs)


def kernel_floor(fn: Callable[[], object], repeats: int = 5) -> dict:
    """Seconds the floor kernels of one `fn()` call take when run alone (median over `repeats` replays).

    Runs `fn` once to record its kernel calls, then replays exactly those calls (same operators, shapes,
    strides and scalar arguments, inputs sharing memory where the step's did, allocated once up front)
    with nothing else in between.
    """
    rec = KernelRecorder()
    with rec:
        fn()
    calls = materialize(rec.calls)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first replay warms up
            t = time.perf_counter()
            for f, a, k in calls:
                f(*a, **k)
            times.append(time.perf_counter() - t)
    by_op = Counter(f.overloadpacket.__name__ for f, _, _ in rec.calls)
    return {"floor_s": median(times[1:]), "kernel_calls": len(calls), "calls_by_op": dict(by_op)}


def measured_ceiling(wall_s: float, floor: dict) -> float:
    """The largest speed-up over a reference taking `wall_s` per call that its own `kernel_floor` allows."""
    return wall_s / floor["floor_s"] if floor["floor_s"] > 0 else float("inf")
