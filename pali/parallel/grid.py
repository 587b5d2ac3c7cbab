"""The 3-D process grid: world = DP x PP x TP, TP innermost (fastest), then PP, then DP.

Global rank r sits at (dp_rank, pp_rank, tp_rank) with r = (dp_rank * pp + pp_rank) * tp + tp_rank, the
layout of fairscale's `initialize_model_parallel(tp, pipeline_length=pp)`, which builds the groups (its
"model parallel" group is our TP group; its "data parallel" group is our DP group). fairscale keeps the
groups in module globals, so only one Grid is live per process; `Grid.init` replaces the previous one.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

_CURRENT: Grid | None = None


@dataclass
class Grid:
    """This rank's place in the DP x PP x TP grid and the process groups it belongs to."""

    dp: int
    """Data-parallel degree (model replicas)."""
    pp: int
    """Pipeline stages per replica."""
    tp: int
    """Tensor-parallel ranks per stage."""
    dp_rank: int
    """Index of this rank's replica."""
    pp_rank: int
    """Index of this rank's pipeline stage."""
    tp_rank: int
    """Index of this rank inside its tensor-parallel group."""
    dp_group: dist.ProcessGroup
    """Ranks holding the same (pp_rank, tp_rank) shard in every replica (gradient all-reduce)."""
    pp_group: dist.ProcessGroup
    """Ranks of one replica with the same tp_rank, one per stage (activations travel here)."""
    tp_group: dist.ProcessGroup
    """Ranks sharing one stage's layers (column/row-parallel collectives)."""
    world: int = 1
    """dp * pp * tp."""
    rank: int = 0
    """Global rank."""
    embed_group: dist.ProcessGroup | None = None
    """The two stages of a replica holding the token embedding (stage 0 and the first decoder-side stage,
    same tp_rank); the pipeline group when pp=2; None when pp=1 or this rank holds no copy."""

    @classmethod
    def init(cls, dp: int | None = None, pp: int = 1, tp: int = 1) -> Grid:
        """Build (or rebuild) the grid over the already initialised default process group.

        dp=None means world // (pp * tp). Raises ValueError naming the sizes when they do not multiply
        to the world size.
        """
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call init_process_group first "
                               "(Ray Train does this inside its workers)")
        world = dist.get_world_size()
        for name, value in (("pp", pp), ("tp", tp)) + ((("dp", dp),) if dp is not None else ()):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected a positive integer")
        if dp is None:
            if world % (pp * tp):
                raise ValueError(f"world size {world} is not a multiple of pp*tp = {pp}*{tp} = {pp * tp}")
            dp = world // (pp * tp)
        if dp * pp * tp != world:
            raise ValueError(f"dp*pp*tp = {dp}*{pp}*{tp} = {dp * pp * tp} but the world size is {world}; "
                             f"expected the three degrees to multiply to {world}")
        global _CURRENT
        if _CURRENT is not None:
            _CURRENT.destroy()
        elif fs_init.model_parallel_is_initialized():
            fs_init.destroy_model_parallel()
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints the sizes on rank 0
            fs_init.initialize_model_parallel(tp, pipeline_length=pp)
        rank = dist.get_rank()
        grid = cls(dp=dp, pp=pp, tp=tp, dp_rank=rank // (pp * tp), pp_rank=(rank // tp) % pp,
                   tp_rank=rank % tp, dp_group=fs_init.get_data_parallel_group(),
                   pp_group=fs_init.get_pipeline_parallel_group(),
                   tp_group=fs_init.get_model_parallel_group(), world=world, rank=rank)
        assert dist.get_rank(grid.pp_group) == grid.pp_rank and dist.get_rank(grid.tp_group) == grid.tp_rank
        if pp == 2:
            grid.embed_group = grid.pp_group
        elif pp > 2:
            k = (pp + 1) // 2  # pali.parallel.deep.first_decoder_stage
            for d in range(dp):  # every rank creates every group, in the same order
                for t in range(tp):
                    ranks = [grid.global_rank(d, 0, t), grid.global_rank(d, k, t)]
                    group = dist.new_group(ranks)
                    if rank in ranks:
                        grid.embed_group = group
        _CURRENT = grid
        return grid

    @property
    def is_first_stage(self) -> bool:
        """True on pipeline stage 0 (it reads images and prompts)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the last pipeline stage (it computes the loss)."""
        return self.pp_rank == self.pp - 1

    def global_rank(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        """Global rank of grid position (dp_rank, pp_rank, tp_rank)."""
        return (dp_rank * self.pp + pp_rank) * self.tp + tp_rank

    def destroy(self) -> None:
        """Forget this grid (fairscale's globals too) so a new Grid can be built in the same process.

        The torch process groups themselves stay registered: DTensor caches meshes by their ranks, so an
        FSDP2 engine on a later grid over the same ranks may still name one of them (a few idle gloo /
        nccl groups per rebuild is the cost).
        """
        global _CURRENT
        fs_init.destroy_model_parallel()
        if _CURRENT is self:
            _CURRENT = None

    def __repr__(self) -> str:
        return (f"Grid(dp={self.dp}, pp={self.pp}, tp={self.tp}; rank {self.rank} at dp_rank={self.dp_rank}, "
                f"pp_rank={self.pp_rank}, tp_rank={self.tp_rank})")
