"""Pretrain PaLI on Ray: `python -m jobs.pretrain` (embedded default) or via `ray job submit`.

With no arguments: starts a local Ray, generates synthetic multilingual shards under data/ if absent,
pretrains the tiny preset's vision tower on the shards' image labels (the vision stage), trains the
whole model with that tower frozen on 2 workers, writes a serving checkpoint, prints held-out loss, sample
generations in several languages and the per-language evaluation table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pali import storage
from pali.cli import add_config_flags, config_from_args
from pali.config import parse_overrides
from pali.train.config import TrainConfig

FLAG_GROUPS = {
    "model": ("preset", "init_from", "vision_pretrain_steps"),
    "data": ("data", "eval_data", "tokenizer", "task_weights", "column_map", "default_lang"),
    "optimisation": ("steps", "global_batch", "micro_batch", "lr", "schedule", "warmup_steps", "min_lr_ratio",
                     "vision_lr_mult", "optimizer", "weight_decay", "grad_clip", "seed"),
    "layout": ("tp", "pp", "workers", "min_workers", "max_workers", "cpus_per_worker", "worker_resources", "use_gpu",
               "dp_mode", "pp_schedule", "activation_checkpointing", "compile", "no_compile", "trim_padding"),
}
"""`--help` groups of `TrainConfig`'s flags; fields not listed (a new one) land in "run"."""


def build_parser() -> argparse.ArgumentParser:
    """The flags: one per `TrainConfig` field (`pali.cli`), plus the model shortcuts and the launcher's own."""
    p = argparse.ArgumentParser(prog="python -m jobs.pretrain", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(p, TrainConfig, groups=FLAG_GROUPS, skip={"model_overrides"}, default_group="run")
    g = p.add_argument_group("model overrides")
    g.add_argument("--image-size", type=int, default=None, help="train at this resolution (interpolates position "
                   "embeddings of --init-from: PaLI's high-res phase)")
    g.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the vision tower frozen (PaLI's 224 px phase)")
    g.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="any model config field, e.g. text__dropout_rate=0.1 (JSON values)")
    g = p.add_argument_group("launcher")
    g.add_argument("--no-eval", action="store_true", help="skip the end-of-run held-out report and evaluation")
    g.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="existing cluster (default: RAY_ADDRESS, else a local Ray)")
    g.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of a local Ray (oversubscribed on purpose)")
    g.add_argument("--no-ray-auth", action="store_true",
                   help="start the local Ray without token authentication (warned: its ports listen on every "
                        "interface); a cluster joined with --ray-address keeps its own settings")
    g.add_argument("--threads-per-worker", type=int, default=1, help="torch threads per training worker")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Flags over a preset; returns the validated run config and the raw namespace."""
    a = build_parser().parse_args(argv)
    overrides = parse_overrides(a.override)
    if a.image_size is not None:
        overrides["vision__image_size"] = a.image_size
    if a.freeze_vision is not None:
        overrides["freeze_vision"] = a.freeze_vision
    cfg = config_from_args(TrainConfig, a, model_overrides=overrides)
    cfg.validate()
    return cfg, a


def init_ray(address: str | None, num_cpus: int, no_auth: bool = False) -> None:
    """Connect to a cluster, or start a local one with oversubscribed logical CPUs (see docs/design.md).

    A cluster joined by address keeps the user's auth settings as they are; a local one keeps Ray's
    token authentication on unless `no_auth` (or `RAY_AUTH_MODE=disabled`) says otherwise.
    """
    import ray

    if ray.is_initialized():
        return
    # Ray Data logs every stream's start, plan and end at INFO, and two warnings that do not apply here (the
    # trainer turns progress bars off; the "may hang forever" budget notice fires before its tasks start):
    # the console is the run's own progress; Ray Data's errors still show (RAY_DATA_LOG_LEVEL overrides).
    data_level = os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # this driver's evaluation streams too
    env = {"env_vars": {"OMP_NUM_THREADS": "1", "RAY_DATA_LOG_LEVEL": data_level}}
    if address:
        ray.init(address=address, runtime_env=env)
    else:
        from cluster.auth import use_in_this_process

        use_in_this_process(no_auth_flag=no_auth)
        # The dashboard (on 127.0.0.1, behind the token) serves Ray's State API, which Ray Train's
        # placement-group cleaner polls: without it the cleaner warns every few seconds for the whole run.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env=env)


def main(argv: list[str] | None = None) -> int:
    """Train, consolidate, report."""
    cfg, a = parse_args(argv)
    init_ray(a.ray_address, a.num_cpus, no_auth=a.no_ray_auth)
    from pali.train.consolidation import consolidate, write_summary
    from pali.train.resources import unmet_resources
    from pali.train.trainer import fit

    if not a.ray_address:  # a local Ray never grows: fail now instead of waiting for resources forever
        import ray

        problem = unmet_resources(cfg, ray.cluster_resources())
        if problem:
            print(f"[pali] {problem}", file=sys.stderr)
            return 2

    t0 = time.time()
    result, mcfg, tok = fit(cfg, threads_per_worker=a.threads_per_worker)
    if result.error:
        print(f"[pali] training failed: {result.error}", file=sys.stderr)
        return 1
    if result.checkpoint is None:
        print("[pali] training produced no checkpoint", file=sys.stderr)
        return 1
    with result.checkpoint.as_directory() as d:
        final = consolidate(d, storage.join(cfg.output_dir, "final"), tok)
    train_s = time.time() - t0
    out = cfg.output_dir
    print(f"[pali] trained {cfg.steps} steps in {train_s:.0f} s; serving checkpoint: {final}")
    print(f"[pali] metrics: {storage.join(out, 'metrics.jsonl')}, TensorBoard: {storage.join(out, 'tensorboard')}, "
          f"loss curves: {storage.join(out, 'loss_curves.png')}")
    summary = {"steps": cfg.steps, "train_seconds": train_s, "checkpoint": str(final),
               "final_metrics": result.metrics}
    local = cfg.local_output_dir()
    if not a.no_eval:
        summary.update(evaluate_run(cfg, str(final), local))
    write_summary(local / "summary.json", summary)
    if storage.is_uri(out):  # the driver's record joins the workers' on the storage
        for name in ("summary.json", "heldout.json", "eval"):
            storage.upload(local / name, storage.join(out, name))
    return 0


def evaluate_run(cfg: TrainConfig, final: str, local: Path) -> dict:
    """Held-out loss and samples, then the benchmark metrics, of the serving checkpoint; their summary."""
    from pali.train.heldout import dump, format_samples, heldout_report

    rep = heldout_report(final, cfg.eval_data, num_examples=cfg.eval_examples, seed=cfg.seed + 1,
                         column_map=cfg.column_map, default_lang=cfg.default_lang)
    dump(rep, str(local / "heldout.json"))
    print(format_samples(rep))
    summary: dict = {"heldout": {k: rep[k] for k in ("loss", "loss_per_task", "exact_match")}}
    try:
        from pali.eval import evaluate
        from pali.eval.report import format_table

        metrics = evaluate(final, cfg.eval_data, out_dir=str(local / "eval"), column_map=cfg.column_map,
                           default_lang=cfg.default_lang)
        print(format_table(metrics))
        summary["eval"] = metrics.get("overall", metrics)
    except Exception as e:  # the checkpoint and training record stay valid; say what failed
        print(f"[pali] evaluation failed: {type(e).__name__}: {e}", file=sys.stderr)
        summary["eval_error"] = str(e)
    return summary


if __name__ == "__main__":
    sys.exit(main())
