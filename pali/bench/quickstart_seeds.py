"""The quick start (`python -m jobs.pretrain`, the default recipe) over several seeds, and its held-out figures.

    python -m pali.bench.quickstart_seeds --seeds 0 1 2            # ~8-18 min per seed on 2 CPU cores
    python -m pali.bench.quickstart_seeds --collect runs/qs         # the table of runs already made

"A seed" is `--seed`: the model's initial weights, the vision stage, the tokenizer, the task mixture and
the data order. The corpus stays fixed: `data/train` and `data/val` are generated once (seed 0 and
1000, as a fresh clone's first quick start writes them) and every seed reads them. The seeds run one
after the other, each in its own run directory `OUT/sS` (nothing resumes), with the job's console
written to `OUT/sS.log`. Prints a markdown table per seed, then the mean and range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pali.bench.common import environment

COLUMNS = (("heldout_loss", "held-out loss", "{:.3f}"), ("cider", "CIDEr", "{:.1f}"),
           ("ocr_anls", "OCR ANLS", "{:.1f}"), ("ocr_anls_min_lang", "OCR ANLS, worst language", "{}"),
           ("vqa", "VQA %", "{:.1f}"), ("caption_exact", "caption exact %", "{:.1f}"),
           ("data_wait_frac", "data wait %", "{:.1%}"), ("wall_min", "wall min", "{:.1f}"))


def collect(run_dir: Path, wall_s: float | None = None) -> dict:
    """One finished run's figures: held-out loss, the evaluation's CIDEr / OCR ANLS (overall, per language)
    / VQA accuracy, exact-match captions over the evaluation set, the data wait and the wall time."""
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = json.loads((run_dir / "eval" / "metrics.json").read_text())
    caps = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    caps = [p for p in caps if p["task"] == "caption"]
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait_frac"] for r in logs if "data_wait_frac" in r]
    per_lang = {lang: m["ocr/anls"] for lang, m in ev["langs"].items()}
    worst = min(per_lang, key=per_lang.get)
    return {"heldout_loss": summary["heldout"]["loss"], "cider": ev["overall"]["caption/cider"],
            "ocr_anls": ev["overall"]["ocr/anls"], "ocr_anls_per_lang": per_lang,
            "ocr_anls_min": per_lang[worst], "ocr_anls_min_lang": f"{per_lang[worst]:.1f} ({worst})",
            "vqa": ev["overall"]["vqa/accuracy"],
            "caption_exact": 100 * sum(p["prediction"].strip() in p["references"] for p in caps) / max(len(caps), 1),
            "data_wait_frac": statistics.mean(waits) if waits else float("nan"),
            "train_s": summary["train_seconds"], "wall_min": (wall_s or summary["train_seconds"]) / 60}


def table(rows: dict[int, dict]) -> str:
    """Markdown: one row per seed, then mean and range (min-max) of every numeric column."""
    head = "| seed | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for seed, r in sorted(rows.items()):
        lines.append(f"| {seed} | " + " | ".join(fmt.format(r[k]) for k, _, fmt in COLUMNS) + " |")
    for label, agg in (("mean", statistics.mean), ("range", None)):
        cells = []
        for k, _, fmt in COLUMNS:
            key = "ocr_anls_min" if k == "ocr_anls_min_lang" else k
            vals = [r[key] for r in rows.values()]
            f = fmt if fmt != "{}" else "{:.1f}"
            cells.append(f.format(agg(vals)) if agg else f"{f.format(min(vals))}-{f.format(max(vals))}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_seed(seed: int, out: Path, extra: list[str]) -> dict:
    """`python -m jobs.pretrain --seed S --output-dir OUT/sS` (console to OUT/sS.log); its figures."""
    run_dir = out / f"s{seed}"
    cmd = [sys.executable, "-m", "jobs.pretrain", "--seed", str(seed), "--output-dir", str(run_dir), *extra]
    t = time.time()
    with open(out / f"s{seed}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if rc.returncode:
        raise RuntimeError(f"seed {seed} failed (exit {rc.returncode}); see {out / f's{seed}.log'}")
    return collect(run_dir, time.time() - t)


def main(argv: list[str] | None = None) -> None:
    """Run (or `--collect`) the seeds and print the table."""
    p = argparse.ArgumentParser(prog="python -m pali.bench.quickstart_seeds", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/quickstart-seeds", help="one run directory per seed under it")
    p.add_argument("--collect", metavar="OUT", help="only tabulate the finished runs OUT/s<seed>")
    a, extra = p.parse_known_args(argv)  # anything else goes to jobs.pretrain
    env = environment(1)
    if a.collect:
        out = Path(a.collect)
        rows = {s: collect(out / f"s{s}") for s in a.seeds}
    else:
        from pali.train.config import TrainConfig
        from pali.train.prepare import prepare

        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        prepare(TrainConfig(output_dir=str(out / "corpus")))  # the fixed corpus (seed 0), before any seed runs
        rows = {s: run_seed(s, out, extra) for s in a.seeds}
    (out / "seeds.json").write_text(json.dumps({"environment": env, "seeds": rows}, indent=1))
    print(f"# quick start over seeds {a.seeds} ({env['date']}; {env['cpu']}, {env['cores']} cores; "
          f"commit {env['commit']}; load average at start {env['load_avg_at_start']})\n")
    print(table(rows))


if __name__ == "__main__":
    main()
