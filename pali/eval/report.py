"""Evaluation outputs: the per-language table, `report.md` and its PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pali.eval.metrics import HEADLINE, TASK_METRICS

CHART_FILE = "per_language.png"
"""Name of the chart written next to report.md."""


def format_table(metrics: dict[str, Any]) -> str:
    """A fixed-width text table: one row per language, one column per task headline, plus the mean row.

    ```
    lang      n  caption/cider  vqa/accuracy
    en       12          41.20         33.33
    ...
    mean     40          38.02         30.00
    ```
    """
    tasks = list(metrics.get("tasks", {}))
    cols = [f"{t}/{HEADLINE[t]}" for t in tasks]
    widths = [max(len(c), 8) for c in cols]
    header = "".join("  " + c.rjust(w) for c, w in zip(cols, widths, strict=True))
    lines = ["lang".ljust(10) + "n".rjust(6) + header]
    for lang, row in metrics.get("langs", {}).items():
        cells = "".join("  " + (f"{row[c]:.2f}" if c in row else "-").rjust(w)
                        for c, w in zip(cols, widths, strict=True))
        lines.append(lang.ljust(10) + str(row["num_examples"]).rjust(6) + cells)
    overall = metrics.get("overall", {})
    cells = "".join("  " + f"{overall.get(c, 0.0):.2f}".rjust(w) for c, w in zip(cols, widths, strict=True))
    lines.append("mean".ljust(10) + str(overall.get("num_examples", 0)).rjust(6) + cells)
    return "\n".join(lines)


def caption_table(metrics: dict[str, Any]) -> str:
    """Captioning CIDEr per language, then the mean over all languages, over the non-English ones and
    English alone: the layout in which Crossmodal-3600 results are published ("" without captioning).

    ```
    lang         n    CIDEr
    ar         100    41.20
    ...
    mean (36)         38.02
    non-en (35)       37.10
    en                70.33
    ```
    """
    t = metrics.get("tasks", {}).get("caption")
    if not t:
        return ""
    lines = ["lang".ljust(12) + "n".rjust(6) + "CIDEr".rjust(9)]
    for lang, row in t["langs"].items():
        lines.append(lang.ljust(12) + str(row["num_examples"]).rjust(6) + f"{row['cider']:9.2f}")
    lines.append(f"mean ({len(t['langs'])})".ljust(18) + f"{t['cider']:9.2f}")
    lines.append(f"non-en ({t.get('num_non_en_langs', 0)})".ljust(18) + f"{t.get('cider_non_en') or 0.0:9.2f}")
    en = t.get("cider_en")
    lines.append("en".ljust(18) + (f"{en:9.2f}" if en is not None else "-".rjust(9)))
    return "\n".join(lines)


def plot_per_language(metrics: dict[str, Any], path: str | Path) -> Path:
    """Grouped bar chart of each task's headline per language, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: Ray workers and CI have no display
    import matplotlib.pyplot as plt

    langs = list(metrics.get("langs", {}))
    tasks = list(metrics.get("tasks", {}))
    # capped width: a 100-language chart stays a readable (and quick to render) strip
    fig, ax = plt.subplots(figsize=(min(24.0, max(4.0, 0.6 * len(langs) * max(1, len(tasks)) + 2)), 3.5))
    width = 0.8 / max(1, len(tasks))
    for k, task in enumerate(tasks):
        per_lang = metrics["tasks"][task]["langs"]
        xs = [i + k * width for i in range(len(langs))]
        ys = [per_lang.get(lang, {}).get(HEADLINE[task], 0.0) for lang in langs]
        ax.bar(xs, ys, width=width, label=f"{task} {HEADLINE[task]}")
    ax.set_xticks([i + width * (len(tasks) - 1) / 2 for i in range(len(langs))], langs)
    ax.set_ylabel("score (0-100; CIDEr x100)")
    ax.set_title("per-language scores")
    if tasks:
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(metrics: dict[str, Any], out_dir: str | Path,
                 run_info: dict[str, Any] | None = None) -> Path:
    """Write `metrics.json`, `report.md` and the per-language chart into `out_dir`; returns report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, ensure_ascii=False))
    plot_per_language(metrics, out / CHART_FILE)
    info = run_info or {}
    lines = ["# Evaluation report", ""]
    for key, value in info.items():
        lines.append(f"- **{key}**: `{value}`")
    lines += ["", "## Per task", "", "| task | n | metric | score |", "|---|---|---|---|"]
    for task, t in metrics.get("tasks", {}).items():
        for name in TASK_METRICS[task]:
            lines.append(f"| {task} | {t['num_examples']} | {name} | {t[name]:.2f} |")
    lines += ["", "## Per language", "", "```", format_table(metrics), "```", "",
              f"![per-language scores]({CHART_FILE})", ""]
    if len(metrics.get("tasks", {}).get("caption", {}).get("langs", {})) > 1:
        lines += ["## Captioning CIDEr per language", "", "```", caption_table(metrics), "```", ""]
    tasks = metrics.get("tasks", {})
    empty = {task: t["empty_predictions"] for task, t in tasks.items() if t["empty_predictions"]}
    if empty:
        lines.append(f"Empty predictions (scored as given, i.e. ~0): {empty}")
    if metrics.get("skipped_no_references"):
        lines.append(f"Examples without references (not scored): {metrics['skipped_no_references']}")
    lines += ["", "Scores are 0-100; CIDEr-D is x100 of the pycocoevalcap value; a task's score is the mean",
              "over its languages. Per-example outputs are in `predictions.jsonl`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
