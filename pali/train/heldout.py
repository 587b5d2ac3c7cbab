"""End-of-run look at held-out data: token loss per task and sample generations in several languages."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import torch


@torch.no_grad()
def heldout_report(ckpt_dir: str, eval_paths: list[str], num_examples: int = 64, seed: int = 0,
                   samples_per_lang: int = 2, column_map: str | None = None,
                   default_lang: str | None = None) -> dict[str, Any]:
    """Loss over `num_examples` held-out training-style examples and greedy samples of eval examples
    (`column_map` / `default_lang`: how the shards name their columns, see `pali.data.schema.ReadOptions`)."""
    from pali.data.pipeline import DataConfig, build_dataset, build_eval_dataset, collate
    from pali.serving_checkpoint import load_pretrained

    model, tok = load_pretrained(ckpt_dir)
    dcfg = DataConfig.for_model(model.cfg, seed=seed, paths=list(eval_paths), column_map=column_map,
                                default_lang=default_lang)
    batch = collate(build_dataset(dcfg, tok).limit(num_examples).take_batch(num_examples, batch_format="numpy"))
    out = model(pixel_values=batch["pixel_values"].float(), input_ids=batch["input_ids"].long(),
                attention_mask=batch["attention_mask"].long(), labels=batch["labels"].long(),
                image_mask=batch["image_mask"].long())
    # Per-task loss from per-token cross-entropy.
    logits, labels = out.logits.float(), batch["labels"].long()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.masked_fill(labels == 0, -100),
                                           ignore_index=-100, reduction="none")
    sums, counts = defaultdict(float), defaultdict(int)
    for i, task in enumerate(batch["task"]):
        sums[task] += float(ce[i].sum())
        counts[task] += int((labels[i] != 0).sum())
    per_task = {t: sums[t] / max(counts[t], 1) for t in sorted(sums)}

    ev = collate(build_eval_dataset(dcfg, tok, tasks=("caption", "vqa", "ocr"))
                 .limit(4 * num_examples).take_batch(4 * num_examples, batch_format="numpy"))
    pred = model.generate(ev["pixel_values"].float(), ev["input_ids"].long(), ev["attention_mask"].long(),
                          max_new_tokens=model.cfg.max_target_len)
    texts = tok.decode_batch(pred)
    samples, per_lang = [], defaultdict(int)
    correct = defaultdict(lambda: [0, 0])
    for i, text in enumerate(texts):
        lang, task = ev["lang"][i], ev["task"][i]
        refs = ev["references"][i]
        ok = text.strip() in [r.strip() for r in refs]
        correct[task][0] += int(ok)
        correct[task][1] += 1
        if per_lang[(lang, task)] < samples_per_lang:
            per_lang[(lang, task)] += 1
            samples.append({"lang": lang, "task": task, "prompt": ev["prompt"][i], "prediction": text,
                            "reference": refs[0] if refs else "", "match": ok})
    return {"loss": float(out.loss), "loss_per_task": per_task, "num_examples": len(batch["task"]),
            "exact_match": {t: c / max(n, 1) for t, (c, n) in correct.items()}, "samples": samples}


def format_samples(report: dict[str, Any], max_rows: int = 24) -> str:
    """A readable table of held-out samples."""
    lines = [f"held-out loss {report['loss']:.3f} over {report['num_examples']} examples; per task: "
             + ", ".join(f"{t} {v:.3f}" for t, v in report["loss_per_task"].items()),
             "exact match: " + ", ".join(f"{t} {v:.0%}" for t, v in sorted(report["exact_match"].items())),
             "", f"{'lang':<5} {'task':<8} {'ok':<3} prompt -> prediction   [reference]"]
    for s in report["samples"][:max_rows]:
        mark = "✓" if s["match"] else "✗"
        lines.append(f"{s['lang']:<5} {s['task']:<8} {mark:<3} {s['prompt']} -> {s['prediction']}   "
                     f"[{s['reference']}]")
    return "\n".join(lines)


def dump(report: dict[str, Any], path: str) -> None:
    """Write the report as JSON."""
    with open(path, "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
