"""The GPU suite's decoding sections (`pali.bench.gpu`): today's growing-cache decoding (`decode`), the
static-shape path replayed as CUDA graphs (`decode_graph`, which the decode targets read), and the two side
by side on one small model (`static_decode`, the CPU row of issue 23)."""

from __future__ import annotations

import time

import torch

import pali
from pali.bench.common import median, time_side_by_side
from pali.bench.gpu_common import GpuCheckConfig, bench_config, full_batch, sync
from pali.config import PaLIConfig


def _decode_model(device: torch.device, preset: str, seed: int = 0) -> tuple[pali.PaLI, torch.dtype]:
    """`preset` with random weights made on the device (seeded: every section decodes the same model), bf16
    on CUDA, float32 on CPU; eval mode."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = pali.PaLI(bench_config(preset))
    return model.to(dtype).eval(), dtype


def _decode_kwargs(cfg: PaLIConfig, batch_size: int, prompt_len: int, max_new_tokens: int, device: torch.device,
                   dtype: torch.dtype) -> dict:
    """generate's inputs: an all-real batch of `batch_size` images and prompts (seed 4)."""
    batch = full_batch(cfg, batch_size, prompt_len, 4, device, seed=4)
    return {"pixel_values": batch["pixel_values"].to(dtype), "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"], "max_new_tokens": max_new_tokens}


def _timed_rows(device: torch.device, cfg: PaLIConfig, decode, kw_of, batches, repeats: int = 3) -> list[dict]:
    """For each batch size: `decode(**kw_of(bs))` once to warm up (and capture), then the median of `repeats`
    timed calls. ms_per_step is a call's time (encoder pass included) over its decoding steps."""
    rows = []
    for bs in batches:
        kw = kw_of(bs)
        decode(**kw)
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            ids = decode(**kw)
            sync(device)
            times.append(time.perf_counter() - t0)
        t, toks = median(times), int((ids != cfg.text.pad_token_id).sum())
        rows.append({"batch_size": bs, "seconds": t, "new_tokens": toks, "tokens_per_s": toks / t,
                     "ms_per_step": 1e3 * t / max(ids.shape[1], 1), "ids": ids})
    return rows


def measure_decode(device: torch.device, gc: GpuCheckConfig) -> dict:
    """Today's KV-cache greedy decoding (the growing cache, `generate(static=False)`) tokens/s at each batch
    size (bf16 weights on CUDA), and on the tiny preset the fraction of tokens where the cache and the
    no-cache decodes agree (float32)."""
    from pali.models.generate import generate

    out: dict = {"preset": gc.decode_preset, "rows": []}
    tiny = pali.create_model("tiny", seed=0).to(device).eval()
    b = full_batch(tiny.cfg, 8, 12, 4, device, seed=3)
    kw = {"pixel_values": b["pixel_values"], "input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
          "max_new_tokens": 16}
    with_cache = generate(tiny, use_cache=True, static=False, **kw)
    no_cache = generate(tiny, use_cache=False, **kw)
    n = min(with_cache.shape[1], no_cache.shape[1])
    out["cache_agreement"] = float((with_cache[:, :n] == no_cache[:, :n]).float().mean())
    del tiny
    model, dtype = _decode_model(device, gc.decode_preset)
    rows = _timed_rows(device, model.cfg, lambda **kw: generate(model, static=False, **kw),
                       lambda bs: _decode_kwargs(model.cfg, bs, gc.prompt_len, gc.max_new_tokens, device, dtype),
                       gc.decode_batches)
    out["rows"] = [{k: v for k, v in r.items() if k != "ids"} for r in rows]
    if len(rows) > 1:
        out["batching_speedup"] = rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    return out


def measure_decode_graph(device: torch.device, gc: GpuCheckConfig) -> dict:
    """Static-shape greedy decoding (`generate_static`; one CUDA graph per step on CUDA, captured in the
    warm-up call) of `gc.decode_preset` at each of `gc.decode_batches`, the rows `measure_decode` has (the
    decode targets read ms_per_step here), with the tokens checked against today's decoding of the same
    model and batch (`generate(static=False)`, untimed)."""
    from pali.models.generate import generate, generate_static

    model, dtype = _decode_model(device, gc.decode_preset)
    rows = _timed_rows(device, model.cfg, lambda **kw: generate_static(model, **kw),
                       lambda bs: _decode_kwargs(model.cfg, bs, gc.prompt_len, gc.max_new_tokens, device, dtype),
                       gc.decode_batches)
    for r in rows:
        ref = generate(model, static=False, **_decode_kwargs(model.cfg, r["batch_size"], gc.prompt_len,
                                                             gc.max_new_tokens, device, dtype))
        ids = r.pop("ids")
        n = min(ids.shape[1], ref.shape[1])
        r["tokens_equal"] = bool(torch.equal(ids, ref))
        r["token_agreement"] = float((ids[:, :n] == ref[:, :n]).float().mean())
    return {"preset": gc.decode_preset, "cuda_graphs": device.type == "cuda", "rows": rows,
            "tokens_equal": all(r["tokens_equal"] for r in rows)}


def compare_static_decode(device: torch.device, gc: GpuCheckConfig) -> dict:
    """Static-shape decoding (`generate_static`: CUDA graphs on CUDA, eager on CPU) against today's growing
    cache (`generate(static=False)`) on `gc.static_decode_run`, same weights and batch, whole greedy calls
    timed in alternation; speedup = today's seconds / static seconds."""
    from pali.models.generate import generate, generate_static

    preset, bs, new = gc.static_decode_run
    model, dtype = _decode_model(device, preset)
    kw = _decode_kwargs(model.cfg, bs, gc.prompt_len, new, device, dtype)
    today, static = generate(model, static=False, **kw), generate_static(model, **kw)

    def synced(fn):
        def run():
            fn(model, **kw)
            sync(device)
        return run
    times = time_side_by_side({"today": synced(lambda m, **k: generate(m, static=False, **k)),
                               "static": synced(generate_static)}, gc.repeats, warmup=1, min_time_s=5.0,
                              max_repeats=30)
    med = {k: median(v) for k, v in times.items()}
    return {"preset": model.cfg.name, "batch_size": bs, "max_new_tokens": new, "steps": int(today.shape[1]),
            "call_s": med, "repeats": len(times["today"]), "tokens_equal": bool(torch.equal(today, static)),
            "speedup": med["today"] / med["static"], "cuda_graphs": device.type == "cuda"}
