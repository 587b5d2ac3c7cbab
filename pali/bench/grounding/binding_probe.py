"""Caption and VQA exact match of the main phase on a frozen, stage-pretrained tower (README training section).

The quick start's main phase in one process, fast: the vision stage's tower (`<run>/vision/tower.safetensors`)
is frozen, so its output tokens are computed once per image and the text side and projector train on them
with the trainer's optimizer and schedule (`pali.train.optim`), batch 32, the quick start's task mixture.
Every `--eval-every` steps it greedy-decodes the held-out shards as captioning and as VQA and prints exact
match: captions overall, either group order, two-kind scenes; VQA overall and by question kind.
`--random-order` names each training caption's groups in a random order (how the corpus wrote them before
the order was fixed) to measure what the fixed order is worth::

    python -m jobs.pretrain                                      # data/, runs/pali-tiny/{vision,tokenizer.model}
    python -m pali.bench.grounding.binding_probe                 # fixed order (the corpus as written)
    python -m pali.bench.grounding.binding_probe --random-order
    python -m pali.bench.grounding.binding_probe --lr 2e-3 --vision-lr-mult 1.0
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch
from safetensors.torch import load_file

import pali
from pali.bench.grounding.breakdown import answer_kind
from pali.bench.grounding.recipe import train as train_steps
from pali.config import get_preset
from pali.data import synthetic
from pali.data.lexicon import GRAMMARS
from pali.data.pipeline import list_shards, preprocess_image
from pali.data.schema import iter_rows
from pali.data.tasks import choose_task, make_example, row_rng, tokenize_examples
from pali.tokenizer import Tokenizer
from pali.train.config import TrainConfig
from pali.train.prepare import QUICKSTART_LANGS
from pali.train.vision import build_tower


def read_rows(paths: list[str], limit: int) -> list[dict]:
    return list(itertools.islice(iter_rows(list_shards(paths)), limit))


def groups_of(row: dict) -> list:
    """The scene's groups, regenerated from the row id (`syn<seed>-<index>`) of a synthetic example."""
    seed, index = row["id"].removeprefix("syn").split("-")
    return synthetic._sample(int(index), int(seed), QUICKSTART_LANGS)[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/train")
    p.add_argument("--eval-data", default="data/val")
    p.add_argument("--run", default="runs/pali-tiny", help="run dir with vision/tower.safetensors, tokenizer.model")
    p.add_argument("--examples", type=int, default=32768)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vision-lr-mult", type=float, default=0.3, help="the projector's lr multiplier")
    p.add_argument("--random-order", action="store_true", help="train on captions with groups in random order")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    tok = Tokenizer.load(f"{a.run}/tokenizer.model")
    rng = np.random.default_rng(0)
    train, test = read_rows([a.data], a.examples), read_rows([a.eval_data], 1024)
    if a.random_order:  # `caption` would sort the groups again, so join the noun phrases directly
        def shuffled(r: dict) -> str:
            gram, groups = GRAMMARS[r["lang"]], groups_of(r)
            return gram.conj.join(gram.np(groups[i]) for i in rng.permutation(len(groups)))

        train = [{**r, "text": shuffled(r)} for r in train]

    tower = build_tower(cfg, 0)
    tower.load_state_dict({k.removeprefix("vision_tower."): v
                           for k, v in load_file(f"{a.run}/vision/tower.safetensors").items()})
    tower.eval()

    @torch.no_grad()
    def features(rows: list[dict]) -> torch.Tensor:
        size = cfg.vision.image_size
        return torch.cat([tower(torch.from_numpy(np.stack([preprocess_image(r["image"], size)
                                                           for r in rows[i:i + 512]])))
                          for i in range(0, len(rows), 512)])

    f_train, f_test = features(train), features(test)
    model = pali.create_model(cfg, seed=0)
    model.freeze_vision()
    model.vision = lambda tokens: tokens  # the batch carries the frozen tower's output tokens
    tc = TrainConfig(steps=a.steps, lr=a.lr, vision_lr_mult=a.vision_lr_mult)
    weights = tc.task_weights

    def batch(idx, rows, feats, tasks, seed):
        exs = [make_example(rows[i], t, tok, row_rng(seed, rows[i]["id"], 1)) for i, t in zip(idx, tasks, strict=True)]
        arrays = tokenize_examples(exs, tok, cfg.max_text_len, cfg.max_target_len)
        return {k: torch.from_numpy(v) for k, v in arrays.items()} | {"pixel_values": feats[list(idx)]}, exs

    kinds = [len(groups_of(r)) for r in test]
    start = time.time()

    @torch.no_grad()
    def evaluate(step: int) -> None:
        model.eval()
        res = {}
        idx = range(len(test))
        for task in ("caption", "vqa"):
            b, exs = batch(idx, test, f_test, [task] * len(test), 0)
            pred = [x.strip() for x in tok.decode_batch(model.generate(
                b["pixel_values"], b["input_ids"], b["attention_mask"], max_new_tokens=cfg.max_target_len))]
            right = [x == e.target.strip() for x, e in zip(pred, exs, strict=True)]
            res[task] = round(float(np.mean(right)), 3)
            if task == "caption":
                orders = [{GRAMMARS[r["lang"]].conj.join(GRAMMARS[r["lang"]].np(g) for g in perm)
                           for perm in itertools.permutations(groups_of(r))} for r in test]
                res["caption_any_order"] = round(float(np.mean([x in o for x, o in zip(pred, orders, strict=True)])), 3)
                res["caption_two_kinds"] = round(float(np.mean([ok for ok, k in zip(right, kinds, strict=True)
                                                                if k == 2])), 3)
            else:
                for kind in ("count", "colour", "shape"):
                    res[kind] = round(float(np.mean([ok for ok, r in zip(right, test, strict=True)
                                                     if answer_kind(r["lang"], r["answer"]) == kind])), 3)
        model.train()
        print(f"step {step}: {json.dumps(res)} ({time.time() - start:.0f} s)", flush=True)

    def next_batch(step: int) -> dict:
        idx = rng.choice(len(train), 32, replace=False)
        return batch(idx, train, f_train, [choose_task(train[i], weights, row_rng(step, train[i]["id"]))
                                           for i in idx], step)[0]

    train_steps(model, tc, next_batch, evaluate, a.eval_every)

if __name__ == "__main__":
    main()
