"""The quick-start recipe in one process, with held-out VQA accuracy by question type (README training section).

The tiny preset, AdamW with the trainer's optimizer and schedule (`pali.train.optim`), batch 32, the PaLI
task mixture over 4096 synthetic examples in the quick start's six languages; every `--eval-every` steps
it greedy-decodes 300 held-out examples as VQA and as captioning and prints exact match overall and for
count, colour and shape questions. One thread, no Ray: the model and data code are the project's own::

    python -m pali.bench.grounding.full_probe --steps 1000
    python -m pali.bench.grounding.full_probe --image 48 --patch 16 --steps 3000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

import pali
from pali.config import get_preset
from pali.data import synthetic
from pali.data.pipeline import preprocess_image
from pali.data.prompts import prompt_templates
from pali.data.tasks import choose_task, default_task_weights, make_example, row_rng, tokenize_examples
from pali.tokenizer import Tokenizer
from pali.train.config import TrainConfig

LANGS = ("en", "fr", "ru", "ar", "hi", "zh")


def question_type(row: dict) -> str:
    from pali.bench.grounding.breakdown import answer_kind

    return answer_kind(row["lang"], row["answer"])


def pretrain_vit(vit: torch.nn.Module, image: int, examples: int, steps: int) -> None:
    """Classification pretraining of the tower on other generated images' labels (shapes, colours, count)."""
    from pali.bench.grounding.vit_probe import scenes, train_on_labels

    train_on_labels(vit, scenes(examples, 0, image), steps)
    print(f"ViT pretrained for {steps} steps", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vision-lr-mult", type=float, default=0.3)
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--examples", type=int, default=4096)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--pretrain-vit", type=int, default=0, metavar="STEPS",
                   help="first train the ViT alone on the scenes' labels for STEPS steps (vit_probe.py's task)")
    p.add_argument("--freeze-vision", action="store_true", help="then keep the ViT frozen (PaLI's main phase)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=a.image, patch_size=a.patch))
    train = [synthetic.make_example(i, 0, LANGS, a.image) for i in range(a.examples)]
    test = [synthetic.make_example(i, 1, LANGS, a.image) for i in range(300)]
    texts = prompt_templates() * 5 + [t for r in train for t in (r["text"], r["question"], r["answer"],
                                                                 r["ocr_text"]) if t]
    tok = Tokenizer.train(texts, cfg.text.vocab_size)
    weights = default_task_weights()

    def batch(rows: list[dict], tasks: list[str], seed: int) -> tuple[dict, list]:
        exs = [make_example(r, t, tok, row_rng(seed, r["id"], 1)) for r, t in zip(rows, tasks, strict=True)]
        arrays = tokenize_examples(exs, tok, cfg.max_text_len, cfg.max_target_len)
        pixels = np.stack([preprocess_image(r["image"], a.image) for r in rows])
        return {k: torch.from_numpy(v) for k, v in arrays.items()} | {"pixel_values": torch.from_numpy(pixels)}, exs

    model = pali.create_model(cfg, seed=0)
    if a.pretrain_vit:
        pretrain_vit(model.vision_tower, a.image, a.examples, a.pretrain_vit)
    if a.freeze_vision:
        model.freeze_vision()
    tc = TrainConfig(steps=a.steps, lr=a.lr, vision_lr_mult=a.vision_lr_mult)
    rng = np.random.default_rng(0)
    start = time.time()

    @torch.no_grad()
    def evaluate(step: int) -> None:
        model.eval()
        res = {}
        for task in ("vqa", "caption"):
            b, exs = batch(test, [task] * len(test), 0)
            pred = tok.decode_batch(model.generate(b["pixel_values"], b["input_ids"], b["attention_mask"],
                                                   max_new_tokens=cfg.max_target_len))
            right = [p.strip() == e.target.strip() for p, e in zip(pred, exs, strict=True)]
            res[task] = round(float(np.mean(right)), 3)
            if task == "vqa":
                for kind in ("count", "colour", "shape"):
                    res[kind] = round(float(np.mean([ok for ok, r in zip(right, test, strict=True)
                                                     if question_type(r) == kind])), 3)
        model.train()
        print(f"step {step}: {json.dumps(res)} ({time.time() - start:.0f} s)", flush=True)

    def next_batch(step: int) -> dict:
        rows = [train[i] for i in rng.choice(len(train), 32, replace=False)]
        return batch(rows, [choose_task(r, weights, row_rng(step, r["id"])) for r in rows], step)[0]

    from pali.bench.grounding.recipe import train as train_steps

    train_steps(model, tc, next_batch, evaluate, a.eval_every)

if __name__ == "__main__":
    main()
