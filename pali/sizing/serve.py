"""Serving capacity: how many model replicas fit on one GPU and how large a batch one replica can decode.

Per replica: the weights (whole model, `dtype`), a fixed runtime overhead, and per sequence in the batch
(times `num_beams`):
    KV cache   = 2 * L_dec * (kv_len + S) * I * e     (self-attention cache over kv_len generated tokens
                                                       + the precomputed cross-attention keys/values)
    encoder    = S * D * e                            (encoder states kept for the whole generation)
    prefill    = max(P * (3 * D_vit + mlp_vit), S * (3 * D + 2 * F)) * e
                                                      (the widest transient of the vision / encoder pass)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pali.config import PaLIConfig
from pali.sizing.hardware import GPU
from pali.sizing.memory import total_params

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class ServePlan:
    """Capacity of one GPU for serving one model."""

    gpu: str
    """GPU name."""
    weights_gb: float
    """Weights of one replica."""
    per_sequence_mb: float
    """KV cache + encoder states + prefill working set of one sequence (all beams)."""
    kv_cache_mb: float
    """The KV-cache part of per_sequence_mb."""
    max_batch_one_replica: int
    """Largest decode batch with one replica on the GPU (0: the weights alone do not fit)."""
    replicas_per_gpu: int
    """Replicas that fit, each serving `batch` sequences."""
    batch: int
    """Batch each of those replicas is sized for."""
    fits: bool
    """At least one replica with batch 1 fits."""

    def to_dict(self) -> dict:
        """JSON form."""
        return asdict(self)


def serve_plan(cfg: PaLIConfig, gpu: GPU, kv_len: int = 64, prompt_len: int = 32, batch: int = 8,
               num_beams: int = 1, dtype: str = "bfloat16", headroom: float = 0.1,
               overhead_gb: float = 1.0) -> ServePlan:
    """Replicas per GPU and the largest batch for decoding `kv_len` tokens (see the module docstring)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    for name, val in (("kv_len", kv_len), ("batch", batch), ("num_beams", num_beams)):
        if val < 1:
            raise ValueError(f"{name}={val}; expected a positive integer")
    e = DTYPE_BYTES[dtype]
    v, t = cfg.vision, cfg.text
    s = v.num_tokens + prompt_len
    weights = total_params(cfg) * e
    kv = 2 * t.num_decoder_layers * (kv_len + s) * t.inner_dim * e * num_beams
    enc = s * t.d_model * e * num_beams
    prefill = max(v.num_tokens * (3 * v.width + v.mlp_dim), s * (3 * t.d_model + 2 * t.d_ff)) * e
    per_seq = kv + enc + prefill
    usable = gpu.memory_bytes * (1 - headroom)
    overhead = overhead_gb * 1e9
    free = usable - weights - overhead
    max_batch = max(0, int(free // per_seq))
    replicas = int(usable // (weights + overhead + batch * per_seq))
    return ServePlan(gpu=gpu.name, weights_gb=weights / 1e9, per_sequence_mb=per_seq / 1e6, kv_cache_mb=kv / 1e6,
                     max_batch_one_replica=max_batch, replicas_per_gpu=replicas, batch=batch, fits=max_batch >= 1)
