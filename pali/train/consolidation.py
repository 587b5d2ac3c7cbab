"""Weights in and out of a run: the init file the workers start from (`init_from`), the serving
checkpoint merged from a sharded training checkpoint, and the run summary."""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path

import torch

from pali.config import PaLIConfig
from pali.storage import ReadOnAccess
from pali.train.config import TrainConfig


def init_state(cfg: TrainConfig, mcfg: PaLIConfig) -> str:
    """The weights file the workers start from when `init_from` is set (no training checkpoint yet).

    Only its header is read here (local or on object storage): each worker reads its own slices of it
    (`init_mapping`), and a run at another resolution (PaLI's high-res phase) gets the position
    embeddings interpolated where that tensor is loaded, not through a full copy on the driver.
    """
    from pali import storage
    from pali.serving_checkpoint import WEIGHTS_FILE, load_config

    src = storage.join(cfg.init_from, WEIGHTS_FILE)
    storage.TensorFile(src)  # exists and is a safetensors file (a clear error here, not on every worker)
    old = load_config(cfg.init_from).vision.image_size
    if old != mcfg.vision.image_size:
        print(f"[pali] position embeddings interpolated {old} px -> {mcfg.vision.image_size} px as each worker "
              f"loads them")
    return src


class ResizedPositions(ReadOnAccess):
    """A read-on-access state whose vision position embeddings are resized, when loaded, to `cfg`'s grid.

    Wraps an init state saved at another image size (PaLI's high-res phase): every other tensor passes
    through unchanged; `vision_tower.pos_embed` is interpolated bicubically (`interpolate_pos_embed`).
    """

    def __init__(self, state: Mapping[str, torch.Tensor], cfg: PaLIConfig):
        self.state, self.cfg = state, cfg

    @property
    def names(self) -> Collection[str]:
        return self.state

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.state[name]
        if name.startswith("vision_tower.") and name.endswith("pos_embed"):
            from pali.models.vit import interpolate_pos_embed

            v = self.cfg.vision
            grid = v.image_size // v.patch_size
            if t.shape[1] != grid * grid + int(v.class_token):
                t = interpolate_pos_embed(t, v.class_token, grid)
        return t


def init_mapping(path: str, cfg: PaLIConfig) -> Mapping[str, torch.Tensor]:
    """The init state at `path` (local or URI) as workers read it: tensor by tensor, resized to `cfg`."""
    from pali import storage

    return ResizedPositions(storage.TensorFile(path), cfg)


def consolidate(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer=None) -> str | Path:
    """Merge a sharded training checkpoint into a serving checkpoint (config.json, model.safetensors,
    tokenizer.model) at `out_dir` (local or a URI), streamed one tensor at a time: no process holds more
    than the largest tensor's shards."""
    from pali.serving_checkpoint import save_streamed
    from pali.tokenizer import Tokenizer
    from pali.train.sharded_checkpoint import LazyShardedState

    state = LazyShardedState(ckpt_dir)
    mcfg = PaLIConfig.from_dict(state.meta["model"])
    if tokenizer is None:
        tokenizer = Tokenizer.load(Path(ckpt_dir) / "tokenizer.model")
    extra = {"training": {"step": state.meta["step"], "layout": state.meta["layout"]}}
    return save_streamed(state, mcfg, tokenizer, out_dir, extra=extra)


def write_summary(path: str | os.PathLike, summary: dict) -> None:
    """JSON summary of a finished run."""
    Path(path).write_text(json.dumps(summary, indent=2, default=str))
