"""Pretrain PaLI on Ray: `python -m jobs.pretrain` (embedded default) or via `ray job submit`.

With no arguments: starts a local Ray, generates synthetic multilingual shards under data/ if absent,
pretrains the tiny preset's vision tower on the shards' image labels (the vision stage), trains the
whole model with that tower frozen on 2 workers, writes a serving checkpoint, prints held-out loss, sample
generations in several languages and the per-language evaluation table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pali.config import parse_overrides
from pali.train.config import TrainConfig


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Flags over a preset; returns the run config and the raw namespace."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m jobs.pretrain", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=d.preset, help="model preset (tiny, small, base, pali-3b, pali-15b, pali-17b)")
    g.add_argument("--init-from", default=None, help="serving checkpoint to start from (e.g. jobs.import_hf output)")
    g.add_argument("--image-size", type=int, default=None, help="train at this resolution (interpolates position "
                   "embeddings of --init-from: PaLI's high-res phase)")
    g.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the vision tower frozen (PaLI's 224 px phase)")
    g.add_argument("--vision-pretrain-steps", type=int, default=d.vision_pretrain_steps,
                   help="classification-pretrain the tower on the shards' image_labels this many steps before "
                   "the main phase, then freeze it (from-scratch runs only; 0: off)")
    g.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="any model config field, e.g. text__dropout_rate=0.1 (JSON values)")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=d.data, help="training shards (files, dirs, s3:// URIs)")
    g.add_argument("--eval-data", nargs="+", default=d.eval_data, help="held-out shards")
    g.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: trained from the shards)")
    g.add_argument("--task-weights", default=None, help='JSON mixture, e.g. \'{"caption": 2, "vqa": 1}\'')
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--global-batch", type=int, default=d.global_batch)
    g.add_argument("--micro-batch", type=int, default=d.micro_batch, help="examples per forward/backward")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--schedule", choices=["rsqrt", "cosine", "constant"], default=d.schedule)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--vision-lr-mult", type=float, default=d.vision_lr_mult,
                   help="lr multiplier of the vision tower and projector")
    g.add_argument("--optimizer", choices=["adamw", "adafactor"], default=d.optimizer)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip)
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("layout")
    g.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel degree")
    g.add_argument("--pp", type=int, default=d.pp, help="pipeline-parallel degree")
    g.add_argument("--workers", type=int, default=d.workers, help="world size (dp = workers / (tp*pp))")
    g.add_argument("--min-workers", type=int, default=None, help="elastic: fewest workers")
    g.add_argument("--max-workers", type=int, default=None, help="elastic: most workers")
    g.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker)
    g.add_argument("--worker-resources", default=None, metavar="JSON",
                   help='extra Ray resources per worker, e.g. \'{"trainer_slot": 1}\'')
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker, nccl, bf16 autocast")
    g.add_argument("--dp-mode", choices=["ddp", "fsdp"], default=d.dp_mode)
    g.add_argument("--pp-schedule", choices=["1f1b", "gpipe"], default=d.pp_schedule)
    g.add_argument("--activation-checkpointing", action="store_true")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each worker's stage (faster steps after a one-off compile)")
    g.add_argument("--no-trim-padding", dest="trim_padding", action="store_false",
                   help="keep every batch at the padded lengths and the output head at every target position "
                        "(default: cut all-padding tail columns, head at real targets; pp = 1 without --compile)")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=d.output_dir)
    g.add_argument("--name", default=d.name, help="run name; rerunning with the same name resumes")
    g.add_argument("--storage-path", default=None, help="shared checkpoint storage (dir, NFS, s3://)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--max-failures", type=int, default=d.max_failures)
    g.add_argument("--no-eval", action="store_true", help="skip the end-of-run held-out report and evaluation")
    g.add_argument("--eval-examples", type=int, default=d.eval_examples)
    g.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="existing cluster (default: RAY_ADDRESS, else a local Ray)")
    g.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of a local Ray (oversubscribed on purpose)")
    g.add_argument("--no-ray-auth", action="store_true",
                   help="start the local Ray without token authentication (warned: its ports listen on every "
                        "interface); a cluster joined with --ray-address keeps its own settings")
    g.add_argument("--threads-per-worker", type=int, default=1, help="torch threads per training worker")
    g.add_argument("--fail-at-step", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    overrides = parse_overrides(a.override)
    if a.image_size is not None:
        overrides["vision__image_size"] = a.image_size
    if a.freeze_vision is not None:
        overrides["freeze_vision"] = a.freeze_vision
    cfg = TrainConfig(
        preset=a.preset, model_overrides=overrides, init_from=a.init_from,
        vision_pretrain_steps=a.vision_pretrain_steps, data=a.data, eval_data=a.eval_data,
        tokenizer=a.tokenizer, task_weights=json.loads(a.task_weights) if a.task_weights else d.task_weights,
        steps=a.steps, global_batch=a.global_batch, micro_batch=a.micro_batch, lr=a.lr, schedule=a.schedule,
        warmup_steps=a.warmup_steps, vision_lr_mult=a.vision_lr_mult, optimizer=a.optimizer,
        weight_decay=a.weight_decay, grad_clip=a.grad_clip,
        seed=a.seed, tp=a.tp, pp=a.pp, workers=a.workers, min_workers=a.min_workers, max_workers=a.max_workers,
        cpus_per_worker=a.cpus_per_worker,
        worker_resources=json.loads(a.worker_resources) if a.worker_resources else {},
        use_gpu=a.use_gpu, dp_mode=a.dp_mode, pp_schedule=a.pp_schedule,
        activation_checkpointing=a.activation_checkpointing, compile=a.compile, trim_padding=a.trim_padding,
        checkpoint_every=a.checkpoint_every,
        log_every=a.log_every, output_dir=a.output_dir, name=a.name, storage_path=a.storage_path,
        max_failures=a.max_failures, eval_examples=a.eval_examples, fail_at_step=a.fail_at_step,
        step_delay_s=a.step_delay)
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
    env = {"env_vars": {"OMP_NUM_THREADS": "1"}}
    if address:
        ray.init(address=address, runtime_env=env)
    else:
        from cluster.auth import use_in_this_process

        use_in_this_process(no_auth_flag=no_auth)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=env)


def main(argv: list[str] | None = None) -> int:
    """Train, consolidate, report."""
    cfg, a = parse_args(argv)
    init_ray(a.ray_address, a.num_cpus, no_auth=a.no_ray_auth)
    from pali.train.trainer import consolidate, fit, unmet_resources, write_summary

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
    out = Path(cfg.output_dir)
    with result.checkpoint.as_directory() as d:
        final = consolidate(d, out / "final", tok)
    train_s = time.time() - t0
    print(f"[pali] trained {cfg.steps} steps in {train_s:.0f} s; serving checkpoint: {final}")
    print(f"[pali] metrics: {out / 'metrics.jsonl'}, TensorBoard: {out / 'tensorboard'}, "
          f"loss curves: {out / 'loss_curves.png'}")
    summary = {"steps": cfg.steps, "train_seconds": train_s, "checkpoint": str(final),
               "final_metrics": result.metrics}
    if not a.no_eval:
        from pali.train.heldout import dump, format_samples, heldout_report

        rep = heldout_report(str(final), cfg.eval_data, num_examples=cfg.eval_examples, seed=cfg.seed + 1)
        dump(rep, str(out / "heldout.json"))
        print(format_samples(rep))
        summary["heldout"] = {k: rep[k] for k in ("loss", "loss_per_task", "exact_match")}
        try:
            from pali.eval import evaluate
            from pali.eval.report import format_table

            metrics = evaluate(str(final), cfg.eval_data, out_dir=str(out / "eval"))
            print(format_table(metrics))
            summary["eval"] = metrics.get("overall", metrics)
        except Exception as e:  # the checkpoint and training record stay valid; say what failed
            print(f"[pali] evaluation failed: {type(e).__name__}: {e}", file=sys.stderr)
            summary["eval_error"] = str(e)
    write_summary(out / "summary.json", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
