"""Training run configuration (flags of `jobs.pretrain` map one to one onto these fields)."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class TrainConfig:
    """One pretraining run: model preset + overrides, data, optimisation, layout, checkpoints."""

    preset: str = "tiny"
    """Model preset name (see `pali.config.PRESETS`)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset, e.g. {"vision__image_size": 448} or {"freeze_vision": True}."""
    init_from: str | None = None
    """Serving checkpoint to start from, local or s3://... (an imported model, or the 224 px phase for the
    high-res phase); each worker reads only its slices of it."""
    vision_pretrain_steps: int = 3000
    """Steps of the vision stage before the main phase: a model trained from scratch (no `init_from`)
    first trains its tower to classify the training shards' `image_labels`, then keeps it frozen (unless
    `freeze_vision` is set either way), as PaLI does with its JFT-pretrained ViT. 0 skips the stage; so
    do shards without labels (the tower then trains in the main phase)."""
    data: list[str] = field(default_factory=lambda: ["data/train"])
    """Training shard files, directories or URIs."""
    eval_data: list[str] = field(default_factory=lambda: ["data/val"])
    """Held-out shards for the end-of-run loss, samples and evaluation."""
    tokenizer: str | None = None
    """sentencepiece `.model` to use; None trains one from the training shards' text."""
    column_map: str | None = None
    """Shard columns under other names, `KEY=COLUMN[,...]` (e.g. `text=caption_en,lang=LANGUAGE`): schema column
    KEY is read from source column / JSON key COLUMN (training and held-out data)."""
    default_lang: str | None = None
    """BCP-47 language of rows that carry none (None: such rows are malformed and skipped)."""
    task_weights: dict[str, float] | None = field(default_factory=lambda: {
        "caption": 3.0, "vqa": 3.0, "ocr": 2.0, "split_caption": 1.0, "vqg": 0.5, "span_corruption": 0.5})
    """Task mixture weights (None: the data pipeline's default mixture); the default leans on the tasks the
    end-of-run evaluation scores."""
    steps: int = 1500
    """Optimizer steps to train for."""
    global_batch: int = 32
    """Examples per optimizer step, over all data-parallel ranks (kept constant when the group resizes)."""
    micro_batch: int = 16
    """Examples per forward/backward on one rank (gradient accumulation = global / (dp * micro))."""
    lr: float = 1e-3
    """Peak learning rate."""
    schedule: Literal["rsqrt", "cosine", "constant"] = "rsqrt"
    """Linear warmup then inverse-sqrt decay (PaLI), or cosine to `min_lr_ratio`, or constant."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    vision_lr_mult: float = 0.3
    """Learning-rate multiplier of the vision tower and projector. Trained from scratch with the text
    model's lr, the small-init ViT's tokens collapse towards one vector and the model stops seeing shapes
    and counts; a lower vision lr keeps them apart (see the README's training section)."""
    min_lr_ratio: float = 0.1
    """Final lr / peak lr for the cosine schedule."""
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """AdamW, or Adafactor (factored second moments, as T5 / PaLI)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    seed: int = 0
    """Seed of the model init, data mixture and dropout."""
    tp: int = 1
    """Tensor-parallel degree (innermost grid dimension)."""
    pp: int = 1
    """Pipeline-parallel degree."""
    workers: int = 2
    """Ray Train workers (world size) when not elastic."""
    min_workers: int | None = None
    """Elastic mode: fewest workers to run with (at least tp * pp; a size between multiples of tp * pp trains
    its whole replicas and leaves the rest idle)."""
    max_workers: int | None = None
    """Elastic mode: most workers to grow to."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each worker reserves (keep the sum below the cluster's, so Ray Data tasks can run)."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each worker needs (e.g. {"trainer_slot": 1} to pin workers to node types)."""
    use_gpu: bool = False
    """One GPU per worker, nccl and bf16 autocast."""
    dp_mode: Literal["ddp", "fsdp"] = "ddp"
    """Data-parallel wrapper: DDP, or FSDP2 (sharded parameters and optimizer state)."""
    pp_schedule: Literal["1f1b", "gpipe"] = "1f1b"
    """Pipeline schedule over micro-batches."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass."""
    compile: bool = False
    """Run each worker's stage through torch.compile (inductor): faster steps after a one-off compile
    (the default on GPU, per transformer block; on CPU the whole stage, only with this flag)."""
    no_compile: bool = False
    """On GPU, run the stage eagerly instead of the default per-block torch.compile."""
    trim_padding: bool = True
    """Cut each batch's all-padding tail columns and run the output head at real targets only (pp = 1,
    not compiled; `pali.parallel.engine.trim_padding`)."""
    checkpoint_every: int = 100
    """Write a sharded checkpoint (and report to Ray) every this many steps."""
    log_every: int = 10
    """Write metrics.jsonl / TensorBoard every this many steps."""
    keep_checkpoints: int = 2
    """Sharded checkpoints kept by Ray Train."""
    output_dir: str = "runs/pali-tiny"
    """Run directory, local or s3://... (Ray storage path, metrics, plots, final serving checkpoint)."""
    name: str = "pretrain"
    """Run name under the storage path; rerunning with the same name resumes."""
    storage_path: str | None = None
    """Shared storage for checkpoints (local dir, NFS or s3://...); default `<output_dir>/ray`."""
    max_failures: int = 3
    """Worker-group restarts from the latest checkpoint before the run fails."""
    eval_examples: int = 64
    """Held-out examples for the end-of-run loss and samples."""

    @property
    def elastic(self) -> bool:
        """True when a worker range was given."""
        return self.min_workers is not None or self.max_workers is not None

    def validate(self) -> None:
        """Raise ValueError naming any inconsistent setting."""
        mp = self.tp * self.pp
        for name in ("tp", "pp", "steps", "global_batch", "micro_batch", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.vision_pretrain_steps < 0:
            raise ValueError(f"vision_pretrain_steps must be >= 0; got {self.vision_pretrain_steps}")
        if self.elastic and (self.min_workers or 1) > (self.max_workers or 10**9):
            raise ValueError(f"min_workers {self.min_workers} > max_workers {self.max_workers}")
        # Ray Train may start the group at ANY size in [min, max]: every size that can form whole model
        # replicas must keep the global batch exact, or the range is refused here, before anything starts.
        lo, hi = self.worker_range()
        if not self.elastic and lo % mp:
            raise ValueError(f"world size {lo} is not a multiple of tp*pp = {mp}")
        if self.elastic and lo < mp:
            raise ValueError(f"the worker range [{lo}, {hi}] starts below tp*pp = {mp}: no whole model replica "
                             f"fits in {lo} workers")
        # A size between multiples trains world // (tp*pp) replicas, the rest idle (pali.train.subworld).
        uneven = sorted({n - n % mp for n in range(lo, hi + 1) if self.global_batch % (n // mp)})
        if uneven:
            raise ValueError(f"global batch {self.global_batch} does not split evenly over the data-parallel "
                             f"ranks of world sizes {uneven} in [{lo}, {hi}] (dp = world // (tp*pp = {mp})); "
                             f"pick a global batch divisible by every dp in the range, or narrow the range")
        for name in ("output_dir", "init_from", "tokenizer", "storage_path"):
            value = getattr(self, name)
            if value and "://" in value and not value.split("://", 1)[1].strip("/"):
                raise ValueError(f"{name} {value!r} names no bucket or path")
        from pali.data.schema import ReadOptions

        ReadOptions.make(self.column_map, self.default_lang)  # ValueError naming a bad entry or language
        if not self.vision_lr_mult > 0:
            raise ValueError(f"vision_lr_mult must be > 0; got {self.vision_lr_mult} (freeze the tower with "
                             "freeze_vision instead)")

    def local_output_dir(self) -> Path:
        """Where the driver writes the run's files: `output_dir` itself, or, when that is on object storage,
        a local mirror under the cache (`PALI_CACHE_DIR`, default ~/.cache/pali) that is copied to it."""
        from pali import storage

        if not storage.is_uri(self.output_dir):
            return Path(self.output_dir)
        key = hashlib.sha256(self.output_dir.encode()).hexdigest()[:12]
        return storage.cache_root() / "runs" / f"{self.name}-{key}"

    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) workers Ray Train may run the group with (equal when not elastic)."""
        if not self.elastic:
            return self.workers, self.workers
        mp = self.tp * self.pp
        lo = self.min_workers or mp
        return lo, self.max_workers or lo

    def microbatches(self, dp: int) -> tuple[int, int]:
        """(examples per data-parallel rank per step, micro-batches they are split into)."""
        per_rank = self.global_batch // dp
        n = max(1, per_rank // self.micro_batch)
        while per_rank % n:
            n += 1
        return per_rank, n

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`."""
        return cls(**d)
