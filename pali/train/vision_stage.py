"""The vision stage run from the driver: the tower's classification pretraining as one Ray task, kept in
`<output_dir>/vision/` with a fingerprint so reruns reuse it (the training itself: `pali.train.vision`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pali.config import PaLIConfig
from pali.train.config import TrainConfig


def vision_stage(cfg: TrainConfig, mcfg: PaLIConfig, shards: list[str], threads: int = 1
                 ) -> tuple[bytes | None, PaLIConfig]:
    """Run (or reuse) the vision tower's classification pretraining; returns (the tower's weights as
    safetensors bytes, or None when the shards carry no labels; the model config of the main phase).

    The stage runs as one Ray task with a training worker's resources. Its result is kept in
    `<output_dir>/vision/` with a fingerprint of what it depends on, so a rerun or a resumed run reuses it
    (and makes the same freezing decision) instead of training the tower again. With weights, the main
    phase freezes the tower unless `freeze_vision` was given either way.
    """
    import ray

    from pali.data.pipeline import list_shards
    from pali.data.schema import ReadOptions
    from pali.train.vision import VisionStageConfig

    scfg = VisionStageConfig(steps=cfg.vision_pretrain_steps, seed=cfg.seed,
                             read=ReadOptions.make(cfg.column_map, cfg.default_lang))
    try:
        eval_shards = list_shards(cfg.eval_data)
    except (FileNotFoundError, ValueError):
        eval_shards = []
    fingerprint = scfg.fingerprint(mcfg, shards)
    out = cfg.local_output_dir() / "vision"
    weights_path, report_path = out / "tower.safetensors", out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    weights: bytes | None = None
    if report.get("fingerprint") == fingerprint and (report.get("skipped") or weights_path.is_file()):
        weights = None if report.get("skipped") else weights_path.read_bytes()
        print(f"[pali] vision stage: reusing {out} (same shards, geometry and settings)")
    else:
        print(f"[pali] vision stage: pretraining the tower on the shards' image labels for {scfg.steps} steps")
        resources = {"num_cpus": cfg.cpus_per_worker, "num_gpus": 1 if cfg.use_gpu else 0}
        task = ray.remote(**resources)(_vision_task)
        state_bytes, report = ray.get(task.remote(mcfg, shards, eval_shards, scfg, cfg.use_gpu, threads))
        report["fingerprint"] = fingerprint
        out.mkdir(parents=True, exist_ok=True)
        if state_bytes is not None:  # weights first, then the report that vouches for them
            _write_atomic(weights_path, state_bytes)
            weights = state_bytes
        _write_atomic(report_path, json.dumps(report, indent=2).encode())
    if weights is None:
        print(f"[pali] vision stage skipped: {report.get('skipped')}; the tower trains in the main phase")
        return None, mcfg
    held = report.get("heldout_exact_set")
    acc = ", ".join(f"{k} {v:.0%}" for k, v in held.items()) if held else "no labelled held-out shards"
    print(f"[pali] vision stage: {report['train_images']} images, {report['labels']} labels, "
          f"{report['seconds']:.0f} s; held-out exact label sets: {acc}")
    if "freeze_vision" not in cfg.model_overrides:
        mcfg = mcfg.with_overrides(freeze_vision=True)
    state = ("frozen (PaLI's recipe; --no-freeze-vision trains it)" if mcfg.freeze_vision
             else f"trained at {cfg.vision_lr_mult:g}x lr")
    print(f"[pali] main phase: vision tower {state}")
    return weights, mcfg


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary sibling and rename it into place: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _vision_task(mcfg, shards, eval_shards, scfg, use_gpu: bool, threads: int):
    """Ray task body of `vision_stage`: (safetensors bytes or None, report)."""
    from safetensors.torch import save

    from pali.train.vision import pretrain_vision

    threads = max(1, min(threads, os.cpu_count() or 1))
    state, report = pretrain_vision(mcfg, shards, eval_shards, scfg, device="cuda" if use_gpu else "cpu",
                                    threads=threads)
    return (save(state) if state is not None else None), report
