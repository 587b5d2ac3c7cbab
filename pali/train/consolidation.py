"""Weights in and out of a run: the init file the workers start from (`init_from`), the serving
checkpoint merged from a sharded training checkpoint, and the run summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pali.config import PaLIConfig
from pali.train.config import TrainConfig


def init_state(cfg: TrainConfig, mcfg: PaLIConfig) -> str:
    """Weights file the workers start from when `init_from` is set (no training checkpoint yet).

    A run at another resolution than the init checkpoint (PaLI's high-res phase) gets the position
    embeddings interpolated here, once, so every worker slices the same tensors.
    """
    from safetensors.torch import save_file

    from pali.serving_checkpoint import load_pretrained

    src = Path(cfg.init_from).resolve() / "model.safetensors"
    model, _ = load_pretrained(cfg.init_from)
    if model.cfg.vision.image_size == mcfg.vision.image_size:
        return str(src)
    old = model.cfg.vision.image_size
    model.set_image_size(mcfg.vision.image_size)
    out = Path(cfg.output_dir) / f"init-{mcfg.vision.image_size}px.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    print(f"[pali] position embeddings interpolated {old} px -> {mcfg.vision.image_size} px")
    return str(out)


def consolidate(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Merge a sharded training checkpoint into a serving checkpoint (config.json, model.safetensors,
    tokenizer.model), written atomically."""
    from pali.factory import create_model
    from pali.serving_checkpoint import load_state, save_pretrained
    from pali.tokenizer import Tokenizer
    from pali.train.sharded_checkpoint import load_full

    full = load_full(ckpt_dir, with_optimizer=False)
    mcfg = PaLIConfig.from_dict(full["meta"]["model"])
    model = create_model(mcfg, device="meta")
    load_state(model, full["model"], source=str(ckpt_dir))
    if tokenizer is None:
        tokenizer = Tokenizer.load(Path(ckpt_dir) / "tokenizer.model")
    extra = {"training": {"step": full["meta"]["step"], "layout": full["meta"]["layout"]}}
    return save_pretrained(model, tokenizer, out_dir, extra=extra)


def write_summary(path: str | os.PathLike, summary: dict) -> None:
    """JSON summary of a finished run."""
    Path(path).write_text(json.dumps(summary, indent=2, default=str))
