"""Size a PaLI run before renting the cluster: layouts that fit, memory per GPU, step time, communication.

    python -m jobs.plan --preset pali-17b --nodes 8 --gpus-per-node 8 --gpu h200 --global-batch 4096
    python -m jobs.plan --preset pali-3b --nodes 4 --gpu h100 --global-batch 1024 --seq 32,32 --json
    python -m jobs.plan --preset pali-17b --gpu h100 --serve --kv-len 128 --batch 16
"""

from __future__ import annotations

import argparse
import json
import sys

from pali.config import PaLIConfig, get_preset, parse_overrides
from pali.models.pali import flops_per_example
from pali.sizing.hardware import GPUS, get_gpu
from pali.sizing.memory import Geometry, total_params
from pali.sizing.planner import LayoutPlan, PlanRequest, plan, recommend
from pali.sizing.serve import DTYPE_BYTES, serve_plan


def _seq(text: str) -> Geometry:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--seq {text!r}; expected PROMPT,TARGET positive token counts, e.g. 32,32")
    return Geometry(int(parts[0]), int(parts[1]))


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m jobs.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="pali-17b", help="model preset (tiny ... pali-17b)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="model override as in jobs.pretrain, e.g. text__num_layers=12")
    p.add_argument("--image-size", type=int, default=None, help="resolution (PaLI's high-res phase: 588)")
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=None,
                   help="frozen vision tower (default: the preset's)")
    p.add_argument("--gpu", default="h200", choices=sorted(GPUS))
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--seq", type=_seq, default=Geometry(32, 32), metavar="PROMPT,TARGET",
                   help="prompt and target tokens per example (default 32,32)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of peak reached by executed FLOPs")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of GPU memory kept free")
    p.add_argument("--precision", choices=["amp", "bf16", "fp32"], default="amp",
                   help="amp: fp32 weights + bf16 autocast (jobs.pretrain --use-gpu); bf16: bf16 weights, fp32 master")
    p.add_argument("--micro-batch", type=int, default=None, help="force this micro-batch size")
    p.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    p.add_argument("--top", type=int, default=15, help="table rows (fitting layouts first)")
    p.add_argument("--runnable-only", action="store_true", help="hide layouts pali.parallel cannot run yet")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--storage-path", default="s3://YOUR-BUCKET/pali-runs", help="used in the printed command")
    p.add_argument("--data", default="s3://YOUR-BUCKET/shards/train", help="used in the printed command")
    g = p.add_argument_group("serving (--serve)")
    g.add_argument("--serve", action="store_true", help="plan serving instead of training")
    g.add_argument("--kv-len", type=int, default=64, help="generated tokens held in the KV cache")
    g.add_argument("--batch", type=int, default=8, help="sequences per replica")
    g.add_argument("--beams", type=int, default=1, help="beam width (multiplies the cache)")
    g.add_argument("--serve-dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    return p


def model_config(a: argparse.Namespace) -> PaLIConfig:
    """The preset with --override / --image-size / --freeze-vision applied."""
    overrides = parse_overrides(a.override)
    if a.image_size is not None:
        overrides["vision__image_size"] = a.image_size
    if a.freeze_vision is not None:
        overrides["freeze_vision"] = a.freeze_vision
    return get_preset(a.preset).with_overrides(**overrides)


def submit_command(a: argparse.Namespace, lp: LayoutPlan) -> str:
    """The `ray job submit` line that trains this layout with jobs.pretrain."""
    parts = ["ray job submit --working-dir . -- python -m jobs.pretrain", f"--preset {a.preset}"]
    parts += [f"--override {o}" for o in a.override]
    if a.image_size is not None:
        parts.append(f"--image-size {a.image_size}")
    if a.freeze_vision is not None:
        parts.append("--freeze-vision" if a.freeze_vision else "--no-freeze-vision")
    parts += [f"--data {a.data}", f"--tp {lp.tp}", f"--pp {lp.pp}", f"--workers {lp.tp * lp.pp * lp.dp}",
              f"--global-batch {a.global_batch}", f"--micro-batch {lp.micro_batch}", "--use-gpu"]
    if lp.checkpointing:
        parts.append("--activation-checkpointing")
    parts.append(f"--dp-mode {lp.dp_mode}")
    if lp.pp > 1 and a.schedule != "1f1b":
        parts.append(f"--pp-schedule {a.schedule}")
    parts.append(f"--storage-path {a.storage_path}")
    return " ".join(parts)


def _row(lp: LayoutPlan) -> list[str]:
    m = lp.memory
    return [f"{lp.tp}x{lp.pp}x{lp.dp}", lp.dp_mode, "yes" if lp.checkpointing else "no",
            f"{lp.num_microbatches}x{lp.micro_batch}", f"{m['params']:.1f}", f"{m['grads']:.1f}",
            f"{m['optimizer']:.1f}", f"{m['activations']:.1f}", f"{m['activations_no_ckpt']:.1f}",
            f"{m['activations_ckpt']:.1f}", f"{m['pipeline_buffers'] + m['transient']:.1f}", f"{m['total']:.1f}",
            "yes" if lp.fits else "NO", f"{lp.step_time_s:.2f}", f"{lp.examples_per_s:.0f}", f"{lp.mfu:.2f}",
            f"{lp.bubble:.2f}", f"{lp.comm_gb['tp']:.1f}", f"{lp.comm_gb['pp']:.1f}", f"{lp.comm_gb['dp']:.1f}",
            "yes" if lp.runnable else "model"]


HEADER = ["TPxPPxDP", "dp", "ckpt", "m x mb", "param", "grad", "optim", "act", "act0", "act1", "buf+tr",
          "total", "fits", "step s", "ex/s", "MFU", "bubble", "TP GB", "PP GB", "DP GB", "runs"]


def format_table(rows: list[list[str]]) -> str:
    """Left-aligned text table."""
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(HEADER), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    """Print the plan; exit 1 when no layout fits."""
    a = build_parser().parse_args(argv)
    try:
        cfg = model_config(a)
        gpu = get_gpu(a.gpu)
        if a.serve:
            sp = serve_plan(cfg, gpu, a.kv_len, a.seq.prompt_len, a.batch, a.beams, a.serve_dtype, a.headroom)
            if a.json:
                print(json.dumps({"preset": a.preset, "params": total_params(cfg), **sp.to_dict()}, indent=2))
            else:
                print(f"{a.preset} serving on one {gpu.name} ({gpu.memory_bytes / 1e9:.0f} GB, {a.serve_dtype}, "
                      f"kv_len {a.kv_len}, prompt {a.seq.prompt_len}, beams {a.beams}):\n"
                      f"  weights {sp.weights_gb:.1f} GB; per sequence {sp.per_sequence_mb:.1f} MB "
                      f"(KV cache {sp.kv_cache_mb:.1f} MB)\n"
                      f"  one replica: max batch {sp.max_batch_one_replica}\n"
                      f"  replicas per GPU at batch {sp.batch}: {sp.replicas_per_gpu}")
            return 0 if sp.fits else 1
        req = PlanRequest(cfg, gpu, a.nodes, a.gpus_per_node, a.global_batch, a.seq, a.mfu, a.headroom,
                          precision=a.precision, micro_batch=a.micro_batch, schedule=a.schedule)
        plans = plan(req)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if a.runnable_only:
        plans = [p for p in plans if p.runnable]
    best = recommend(plans)
    fpe = flops_per_example(cfg, a.seq.prompt_len, a.seq.target_len)
    if a.json:
        print(json.dumps({"preset": a.preset, "params": total_params(cfg), "gpu": gpu.name, "nodes": a.nodes,
                          "gpus_per_node": a.gpus_per_node, "global_batch": a.global_batch,
                          "prompt_len": a.seq.prompt_len, "target_len": a.seq.target_len, "mfu_assumed": a.mfu,
                          "precision": a.precision, "flops_per_example": fpe,
                          "recommended": best.to_dict() if best else None,
                          "command": submit_command(a, best) if best else None,
                          "layouts": [p.to_dict() for p in plans]}, indent=1))
        return 0 if best else 1
    print(f"{a.preset}: {total_params(cfg) / 1e9:.2f}B params ({'frozen' if cfg.freeze_vision else 'trained'} "
          f"vision), image {cfg.vision.image_size}px = {cfg.vision.num_tokens} visual tokens, prompt "
          f"{a.seq.prompt_len}, target {a.seq.target_len}, {fpe / 1e12:.2f} TFLOP/example (training)")
    print(f"cluster: {a.nodes} x {a.gpus_per_node} {gpu.name} ({gpu.memory_bytes / 1e9:.0f} GB, "
          f"{gpu.peak_flops / 1e12:.0f} TFLOP/s bf16), global batch {a.global_batch}, assumed MFU {a.mfu}, "
          f"precision {a.precision}, headroom {a.headroom:.0%}")
    print("memory in GB per GPU (worst pipeline stage); act0/act1 = activations without/with checkpointing; "
          "comm in GB sent per GPU per step\n")
    print(format_table([_row(p) for p in plans[:a.top]]))
    if len(plans) > a.top:
        print(f"... {len(plans) - a.top} more layouts (--top N, --json)")
    if best is None:
        print("\nno layout fits: add GPUs, lower --global-batch / --seq, or use --micro-batch 1")
        return 1
    print(f"\nrecommended: TP={best.tp} PP={best.pp} DP={best.dp} {best.dp_mode}"
          f"{' + activation checkpointing' if best.checkpointing else ''}, {best.num_microbatches} micro-batch(es) "
          f"of {best.micro_batch}: {best.memory['total']:.1f} GB/GPU, {best.step_time_s:.2f} s/step, "
          f"{best.examples_per_s:.0f} examples/s" + ("" if best.runnable else "  [modelled only: "
                                                     + "; ".join(best.notes) + "]"))
    print(submit_command(a, best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
