"""Benchmark harness: PaLI against the implementations users would pick instead.

    python -m jobs.benchmark --out bench-out                       # every suite, tiny + small presets
    python -m jobs.benchmark --suite train,decode --preset tiny --repeats 1 --compile none --out /tmp/b  # smoke

Suites: train (train step vs HF-assembled MT5 + SigLIP/ViT + projector, with MFU), decode (KV-cache
greedy / beam vs HF generate), data (Ray Data pipeline vs training consumption, data-wait fraction),
serve (dynamic batching vs batch size 1), parallel (per-rank memory TP=1/TP=2/PP=2, DP=1 -> 2 scaling),
gpu (MFU of a ~1B preset in bf16; only when a GPU exists). Writes `results.json` and `results.md` to
--out, each with hardware, versions, commit, date and the command; every figure is a median over
--repeats, every ratio measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

SUITES = ("train", "decode", "data", "serve", "parallel", "gpu")


def _csv(value: str, allowed: tuple[str, ...] | None, what: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in value.split(",") if x.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"empty {what} list; expected a comma-separated list")
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad}; expected some of {list(allowed)}")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    from pali.config import PRESETS
    from serve.config import INGRESS_ENV

    p = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--suite", type=lambda v: _csv(v, SUITES, "suite"), default=SUITES,
                   help=f"comma-separated suites to run (default: all of {','.join(SUITES)})")
    p.add_argument("--preset", type=lambda v: _csv(v, tuple(PRESETS), "preset"), default=("tiny", "small"),
                   help="model presets of the train and decode suites (default tiny,small); the data suite "
                        "uses the first one, the parallel suite the last (tensors every TP rank replicates, "
                        "such as the patch embedding and norms, are a fixed cost a 1.5 M-parameter model "
                        "overweights)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    p.add_argument("--min-time", type=float, default=3.0,
                   help="train/decode: time at least this many seconds per comparison, adding rounds beyond "
                        "--repeats (up to 100) for millisecond-scale steps (default 3; 0 = exactly --repeats)")
    p.add_argument("--compile", type=lambda v: () if v == "none" else _csv(v, tuple(PRESETS), "preset"),
                   default=("tiny",), metavar="PRESETS",
                   help="train suite: presets also timed with both sides under torch.compile, or 'none' "
                        "(default tiny; a cold compile per side costs 1-3.5 min)")
    p.add_argument("--pipeline-batch", type=int, default=32, metavar="N",
                   help="train suite: also time N examples as the data pipeline pads them (the trainer's "
                        "padding cut vs --no-trim-padding vs HF padded to the longest); 0 = skip (default 32)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for both sides of every comparison (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="batch of the train / decode / parallel suites")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated per prompt (decode suite)")
    p.add_argument("--serve-repeats", type=int, default=3,
                   help="serve load rounds (batching on, then off) in one Ray session; median of per-round ratios")
    p.add_argument("--serve-duration", type=float, default=10.0, help="seconds of load per serving mode")
    p.add_argument("--serve-ingress", type=lambda v: _csv(v, tuple(INGRESS_ENV), "ingress"),
                   default=tuple(INGRESS_ENV),
                   help="Serve HTTP ingresses the serve suite measures, each in its own Ray session "
                        "(default proxy,haproxy; serve.config.INGRESS_ENV)")
    p.add_argument("--data-examples", type=int, default=768, help="synthetic examples of the data suite")
    p.add_argument("--strict", action="store_true", help="stop at the first failing suite (default: record it)")
    p.add_argument("--out", required=True, help="directory for results.json and results.md")
    a = p.parse_args(argv)
    for name in ("repeats", "threads", "batch_size", "max_new_tokens", "serve_repeats", "data_examples"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(a, name)}; expected a positive integer")
    if a.pipeline_batch < 0:
        p.error(f"--pipeline-batch={a.pipeline_batch}; expected 0 (skip) or a positive integer")
    if a.min_time < 0:
        p.error(f"--min-time={a.min_time}; expected >= 0 seconds")
    if a.serve_duration <= 0:
        p.error(f"--serve-duration={a.serve_duration}; expected > 0 seconds")
    return a


def run(a: argparse.Namespace, command: str) -> dict:
    """Run the chosen suites; the result dict that `pali.bench.report.write` stores."""
    import torch

    from pali.bench.common import environment
    from pali.bench.report import check_targets

    torch.set_num_threads(a.threads)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    env = environment(a.threads)
    suites: dict = {}
    timings: dict = {}
    errors: dict = {}
    for suite in a.suite:
        ts = time.perf_counter()
        print(f"[benchmark] suite {suite} ...", file=sys.stderr, flush=True)
        try:
            _run_suite(suite, a, suites)
        except Exception as e:  # one broken suite must not lose the others' numbers; the report names it
            if a.strict:
                raise
            errors[suite] = f"{type(e).__name__}: {e}"
            print(f"[benchmark] suite {suite} failed: {errors[suite]}", file=sys.stderr, flush=True)
        timings[suite] = round(time.perf_counter() - ts, 1)
        torch.set_num_threads(a.threads)  # a suite's subprocess helpers must not leak other settings
    return {"command": command, "environment": env, "repeats": a.repeats, "min_time_s": a.min_time,
            "suite_wall_s": timings,
            "suites": suites, "errors": errors, "targets": check_targets(suites),
            "wall_s": time.perf_counter() - t0}


def _run_suite(suite: str, a: argparse.Namespace, suites: dict) -> None:
    """Run one suite and store its result under its name in `suites`."""
    if suite == "train":
        from pali.bench.train import TrainBenchConfig, run_train

        suites["train"] = run_train(TrainBenchConfig(presets=a.preset, batch_size=a.batch_size,
                                                     repeats=a.repeats, min_time_s=a.min_time,
                                                     compile_presets=a.compile,
                                                     pipeline_batch_size=a.pipeline_batch))
    elif suite == "decode":
        from pali.bench.decode import DecodeBenchConfig, run_decode

        suites["decode"] = run_decode(DecodeBenchConfig(presets=a.preset, batch_size=a.batch_size,
                                                        max_new_tokens=a.max_new_tokens, repeats=a.repeats,
                                                        min_time_s=a.min_time))
    elif suite == "data":
        from pali.bench.data import DataBenchConfig, run_data

        suites["data"] = run_data(DataBenchConfig(preset=a.preset[0], examples=a.data_examples,
                                                  repeats=max(1, min(a.repeats, 3))))
    elif suite == "serve":
        from pali.bench.serve import ServeBenchConfig, run_serve

        suites["serve"] = run_serve(ServeBenchConfig(duration_s=a.serve_duration, repeats=a.serve_repeats,
                                                     ingresses=a.serve_ingress))
    elif suite == "parallel":
        from pali.bench.parallel import ParallelBenchConfig, run_parallel

        suites["parallel"] = run_parallel(ParallelBenchConfig(preset=a.preset[-1], batch_size=a.batch_size,
                                                              repeats=a.repeats))
    elif suite == "gpu":
        from pali.bench.gpu import run_gpu

        suites["gpu"] = run_gpu()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run, write results.json / results.md, print the markdown."""
    from pali.bench.report import to_markdown, write

    args = sys.argv[1:] if argv is None else argv
    a = parse_args(args)
    result = run(a, "python -m jobs.benchmark " + shlex.join(args))
    j, m = write(result, a.out)
    print(to_markdown(result))
    print(f"\nwrote {j} and {m}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
