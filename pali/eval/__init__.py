"""Evaluation: captioning / VQA / OCR metrics per language and Ray Data batch inference.

Metrics (pure Python, no Ray): `cider_d`, `bleu4`, `chrf`, `vqa_accuracy`, `vqa_exact_match`, `anls`,
`compute_metrics`. The job: `evaluate(checkpoint, data_paths, ...)` (see `pali.eval.runner`) and
`format_table(metrics)`; the command line is `python -m jobs.evaluate`.
"""

from pali.eval.anls import anls, ocr_exact_match
from pali.eval.cider import cider_d
from pali.eval.metrics import bleu4, chrf, compute_metrics, task_metrics
from pali.eval.report import format_table, write_report
from pali.eval.vqa import normalize_vqa_answer, vqa_accuracy, vqa_exact_match


def evaluate(*args, **kwargs):
    """Lazy alias of `pali.eval.runner.evaluate` (keeps `import pali.eval` free of Ray)."""
    from pali.eval.runner import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["anls", "bleu4", "chrf", "cider_d", "compute_metrics", "evaluate", "format_table",
           "normalize_vqa_answer", "ocr_exact_match", "task_metrics", "vqa_accuracy", "vqa_exact_match",
           "write_report"]
