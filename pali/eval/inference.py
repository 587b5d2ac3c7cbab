"""Batch inference on Ray Data: an actor pool of predictors, each holding one model copy.

```
shards -> pali.data.pipeline.build_eval_dataset (read, decode/resize, one example per (row, task),
          tokenized prompt, JSON references)
       -> map_batches(Predictor, actor pool: 1 GPU per actor when the cluster has GPUs,
                      a small CPU fraction otherwise; the model is loaded once per actor)
       -> iter_batches on the driver
```

Nothing is split across consumers (no `streaming_split(equal=True)`), so no tail rows are dropped: the
driver sees every example exactly once (the runner checks the count against its scan). A batch whose
`generate` fails yields empty predictions with an `error` field instead of failing the run, so the
predictions already made are never lost.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pali import storage

log = logging.getLogger(__name__)

OUTPUT_COLUMNS: tuple[str, ...] = ("id", "lang", "task", "prompt", "prediction", "references",
                                   "tokenized_references", "error")
"""Fields of one prediction record (`references` a list of strings; `tokenized_references` the benchmark's
own space-separated tokenization of them, [] when the data has none; `error` "" when fine)."""


@dataclass
class InferenceConfig:
    """How to decode and how many model copies to run."""

    checkpoint: str
    """Serving checkpoint directory (config.json, model.safetensors, tokenizer.model)."""
    num_beams: int = 1
    """Beam width (1 = greedy)."""
    max_new_tokens: int = 32
    """Longest generated text in tokens."""
    batch_size: int = 16
    """Examples per `generate` call."""
    num_actors: int | None = None
    """Model copies; default: one per GPU in the cluster, else 1."""
    use_gpu: bool | None = None
    """Put each actor on a GPU; default: when the cluster has GPUs."""
    num_cpus_per_actor: float = 0.25
    """Logical CPUs reserved per CPU actor (fractional so Ray Data's own tasks are never starved)."""
    dtype: str | None = None
    """"float32" / "bfloat16" / "float16"; default bfloat16 on GPU, float32 on CPU."""


class Predictor:
    """Ray Data callable class: loads the checkpoint once, then decodes batches of eval examples.

    Input columns (from `build_eval_dataset`): pixel_values float32[B,3,H,W], input_ids / attention_mask
    int64[B,S], id, lang, task, prompt, references (JSON list). Output: `OUTPUT_COLUMNS`, references
    still as JSON text.
    """

    def __init__(self, checkpoint: str, num_beams: int = 1, max_new_tokens: int = 32,
                 device: str | None = None, dtype: str | None = None):
        import torch

        from pali.serving_checkpoint import load_pretrained

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, dtype or ("bfloat16" if self.device.startswith("cuda") else "float32"))
        self.model, self.tokenizer = load_pretrained(checkpoint, device=self.device, dtype=self.dtype)
        self.num_beams, self.max_new_tokens = num_beams, max_new_tokens

    def _generate(self, batch: dict[str, np.ndarray]) -> list[str]:
        import torch

        from pali.models.t5 import real_length

        mask = torch.from_numpy(np.ascontiguousarray(batch["attention_mask"]))  # (B, S)
        width = real_length(mask.ne(0))  # drop the all-padding tail columns before they travel
        input_ids = torch.from_numpy(np.ascontiguousarray(batch["input_ids"]))[:, :width]
        pixel_values = torch.from_numpy(np.ascontiguousarray(batch["pixel_values"]))  # (B, 3, H, W)
        out = self.model.generate(pixel_values=pixel_values.to(self.device, self.dtype),
                                  input_ids=input_ids.to(self.device),
                                  attention_mask=mask[:, :width].to(self.device),
                                  max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)  # (B, T)
        return self.tokenizer.decode_batch(out.cpu())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        predictions, errors = [""] * n, [""] * n
        if n:
            try:
                predictions = self._generate(batch)
            except Exception as e:  # keep the run (and the other batches' predictions) going
                log.exception("generate failed on a batch of %d", n)
                errors = [f"generate: {type(e).__name__}: {e}"] * n

        def strings(values) -> np.ndarray:
            return np.asarray([str(v) for v in values], dtype=object)

        return {"id": strings(batch["id"]), "lang": strings(batch["lang"]), "task": strings(batch["task"]),
                "prompt": strings(batch["prompt"]), "prediction": strings(predictions),
                "references": strings(batch["references"]),
                "tokenized_references": strings(batch.get("tokenized_references", ["[]"] * n)),
                "error": strings(errors)}


def cluster_gpus() -> int:
    """GPUs the connected Ray cluster advertises."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def predict(shards: Sequence[str], tasks: Sequence[str], langs: Sequence[str] | None, cfg: InferenceConfig,
            stats: Any = None, read_options: Any = None) -> Iterator[list[dict[str, Any]]]:
    """Stream batches of prediction records (dicts with `OUTPUT_COLUMNS`) for every example of `shards`.

    Needs a connected Ray instance; batches arrive in completion order. `stats`: a
    `pali.data.pipeline.DataStats` to count skipped rows into; `read_options`: the readers'
    `pali.data.schema.ReadOptions` (column map, default language).
    """
    import ray

    from pali.data.pipeline import DataConfig, build_eval_dataset
    from pali.serving_checkpoint import TOKENIZER_FILE, load_config
    from pali.tokenizer import Tokenizer

    checkpoint = cfg.checkpoint if storage.is_uri(cfg.checkpoint) else os.path.abspath(cfg.checkpoint)
    model_cfg = load_config(checkpoint)
    tokenizer = Tokenizer.load(os.path.join(checkpoint, TOKENIZER_FILE))
    extra = {} if read_options is None else {"column_map": dict(read_options.column_map),
                                             "default_lang": read_options.default_lang}
    data_cfg = DataConfig.for_model(model_cfg, langs=list(langs) if langs else None,
                                    map_batch_size=max(cfg.batch_size, 16), **extra)
    ds = build_eval_dataset(data_cfg, tokenizer, tasks=tuple(tasks), shards=list(shards), stats=stats)

    gpus = cluster_gpus()
    use_gpu = gpus > 0 if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu:
        num_actors = cfg.num_actors or max(1, gpus)
        resources: dict[str, float] = {"num_gpus": 1}
    else:
        num_actors = cfg.num_actors or 1
        resources = {"num_cpus": cfg.num_cpus_per_actor}
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"checkpoint": checkpoint, "num_beams": cfg.num_beams,
                               "max_new_tokens": cfg.max_new_tokens, "device": "cuda" if use_gpu else "cpu",
                               "dtype": cfg.dtype},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        **resources,
        **storage.remote_args(),  # actors read a checkpoint on object storage with the caller's settings
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield [{"id": str(batch["id"][i]), "lang": str(batch["lang"][i]), "task": str(batch["task"][i]),
                "prompt": str(batch["prompt"][i]), "prediction": str(batch["prediction"][i]),
                "references": json.loads(str(batch["references"][i])),
                "tokenized_references": json.loads(str(batch["tokenized_references"][i]) or "[]"),
                "error": str(batch["error"][i])}
               for i in range(len(batch["id"]))]
