"""Exact byte counts of what a training rank holds: state tensors, and autograd's saved activations.

CPU tensors are not tracked by an allocator torch exposes, so memory is measured by counting tensors:

* `state_bytes`: parameters, gradients and optimizer state of one rank, read from the live tensors (the
  local shard of FSDP2 DTensors), each storage counted once.
* `SavedActivationMeter`: a `saved_tensors_hooks` context that sees every tensor autograd keeps for
  backward, counts each underlying storage once while any saved reference to it is alive, and records
  the peak. Parameters (and views of them) are excluded: they are state. Inside an activation-
  checkpointed block torch's own hooks take precedence, so only what checkpointing really keeps (the
  block inputs) is seen.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def tensors_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors counted by their local shard)."""
    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        t = _local(t)
        key = _storage_key(t)
        seen[key] = key[1]
    return sum(seen.values())


@dataclass
class StateBytes:
    """Bytes of one rank's training state."""

    params: int
    """Parameters held by the rank (frozen ones included)."""
    grads: int
    """Gradients (.grad) held after backward."""
    optimizer: int
    """Optimizer state tensors (e.g. AdamW exp_avg, exp_avg_sq, step)."""

    @property
    def total(self) -> int:
        """params + grads + optimizer."""
        return self.params + self.grads + self.optimizer


def state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> StateBytes:
    """Parameter, gradient and optimizer-state bytes held by this rank (after a step, so state exists)."""
    params = list(module.parameters())
    opt_tensors: list[torch.Tensor] = []
    if optimizer is not None:
        for st in optimizer.state.values():
            opt_tensors.extend(v for v in st.values() if isinstance(v, torch.Tensor))
    return StateBytes(params=tensors_bytes(params), grads=tensors_bytes(p.grad for p in params),
                      optimizer=tensors_bytes(opt_tensors))


def fsdp_unsharded_grad_bytes(module: torch.nn.Module) -> int:
    """Bytes of the unsharded gradients FSDP2 holds right now (what it accumulates while gradient sync is
    off, i.e. between the micro-batches of a step). Reads FSDP2's per-parameter state (private API of
    torch.distributed.fsdp); 0 for a module without FSDP2."""
    grads: list[torch.Tensor] = []
    for mod in module.modules():
        get_state = getattr(mod, "_get_fsdp_state", None)
        group = getattr(get_state(), "_fsdp_param_group", None) if get_state is not None else None
        for fp in getattr(group, "fsdp_params", None) or []:
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None and unsharded.grad is not None:
                grads.append(unsharded.grad)
            acc = getattr(fp, "_unsharded_accumulated_grad", None)
            if acc is not None:
                grads.append(acc)
    return tensors_bytes(grads)


class _Held:
    """What autograd stores instead of the tensor; its death releases the count."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedActivationMeter:
    """Peak bytes of distinct storages autograd keeps for backward while the context is active.

    Use as `with meter: loss = f(x); loss.backward()`; then `meter.peak` (bytes). Storages are counted
    once however many ops save them (e.g. q, k and v all save the same normed input).
    """

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._refs: dict[tuple[int, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        base = t._base if t._base is not None else t
        if isinstance(base, torch.nn.Parameter):  # a weight (or a view of one): counted as state
            return t
        key = _storage_key(_local(t))
        n = self._refs.get(key, 0)
        if n == 0:
            self.live += key[1]
            self.peak = max(self.peak, self.live)
        self._refs[key] = n + 1
        held = _Held(t)
        weakref.finalize(held, self._release, key)
        return held

    def _release(self, key: tuple[int, int]) -> None:
        n = self._refs[key] - 1
        if n == 0:
            del self._refs[key]
            self.live -= key[1]
        else:
            self._refs[key] = n

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def __enter__(self) -> SavedActivationMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
