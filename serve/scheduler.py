"""Iteration-level (continuous) batching for one loaded model, independent of Ray and HTTP.

A `GenRequest` is a small state machine (waiting -> running -> finished) with its own sampling
parameters. One `Scheduler` per loaded model runs one decode loop in its own thread; each iteration

1. drops cancelled rows (a client that went away) and admits waiting requests into free cache slots:
   their images are decoded, the vision tower runs on feature-cache misses only, and the encoder runs
   once over the admitted batch (the "prefill", `SlotCache.prefill`);
2. runs queued beam-search requests as a group of their own (whole-call `model.generate`);
3. advances every running row by one token (`SlotCache.step`, static shapes), samples each row with its
   own parameters, and returns every finished row at once.

The scheduler alone decides who runs; `SlotCache` only executes the batch; the app only talks to
`submit` / `cancel` and receives events through each request's `emit` callback (called on the loop
thread: the app forwards them to its event loop).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pali.data.pipeline import normalize_images, resize_rgb
from pali.models import naflex
from pali.models.generate import filter_logits
from pali.models.slot_cache import SlotCache, all_buckets, bucket_for
from serve.engine import DecodeParams, Item, LoadedModel, Result, decode_items
from serve.features import FeatureCache
from serve.preprocess import InputError, decode_image

log = logging.getLogger("ray.serve")


class QueueFull(RuntimeError):
    """The replica's waiting queue is at `max_queued_requests` (answered with 503 + Retry-After)."""


@dataclass(frozen=True)
class SamplingParams(DecodeParams):
    """Per-request decoding parameters: `DecodeParams` plus a seed (rows with different values share
    decoding steps; num_beams > 1 runs in a beam group of its own)."""

    seed: int | None = None
    """Seed of this request's own generator: equal seeds give equal samples."""

    @classmethod
    def of(cls, params: DecodeParams, seed: int | None) -> SamplingParams:
        """Validated `params` (`serve.engine.check_params`) with this request's seed."""
        return cls(**dataclasses.asdict(params), seed=seed)


@dataclass(eq=False)
class GenRequest:
    """One request and its decoding state."""

    input_ids: list[int]
    """Prompt ids, eos included."""
    image: bytes
    """Encoded image bytes."""
    params: SamplingParams
    """Decoding parameters."""
    emit: Callable[[str, Any], None]
    """Called on the loop thread with ("token", ids so far) when `stream`, then ("done", Result) or
    ("error", exception)."""
    stream: bool = False
    """Emit a token event after every step."""
    max_image_pixels: int = 25_000_000
    """Largest decoded image accepted."""
    state: str = "waiting"
    """waiting -> running -> finished."""
    cancelled: bool = False
    """Set by `Scheduler.cancel`; the row is freed at the next iteration."""
    slot: int = -1
    """Cache row while running."""
    tokens: list[int] = field(default_factory=list)
    """Generated ids so far."""
    batch_size: int = 0
    """Most rows this request shared a step with."""
    generator: torch.Generator | None = None
    """Its sampling generator (seeded requests)."""
    submitted: float = field(default_factory=time.perf_counter)
    """When it was queued."""
    first_token_s: float | None = None
    """Seconds from submission to its first token."""


class EngineStats:
    """Counters of one scheduler (merged into `/v1/stats`)."""

    def __init__(self) -> None:
        self.step_sizes: dict[int, int] = collections.defaultdict(int)  # live rows per step -> steps
        self.tokens = 0
        self.requests = 0
        self.prefills = 0
        self.beam_groups = 0
        self.cancelled = 0
        self.rejected = 0
        self.recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)  # (time, tokens)

    def tokens_per_s(self) -> float:
        """Generated tokens per second over the last ~256 steps (0 when idle for > 10 s)."""
        if len(self.recent) < 2 or time.time() - self.recent[-1][0] > 10:
            return 0.0
        dt = self.recent[-1][0] - self.recent[0][0]
        return sum(n for _, n in list(self.recent)[1:]) / dt if dt > 0 else 0.0


class Scheduler:
    """The decode loop of one loaded model (see the module docstring).

    rows: cache slots (most requests decoding at once); max_len: most tokens per row;
    max_queued: waiting requests beyond which `submit` raises QueueFull.
    """

    def __init__(self, entry: LoadedModel, rows: int, max_len: int, max_queued: int,
                 features: FeatureCache | None = None):
        model = entry.model
        self.entry, self.rows, self.max_len, self.max_queued = entry, rows, max_len, max_queued
        self.features = features
        self.num_visual = model.cfg.vision.num_tokens
        self.cache = SlotCache(model, rows, max_len, self.num_visual + entry.max_text_len)
        if self.cache.k.device.type == "cuda":  # one CUDA graph per bucket, replayed at each step (CPU: eager)
            self.cache.capture(all_buckets(rows))
        self.dtype = next(model.parameters()).dtype
        self.cfg = model.cfg.text
        self.last = torch.full((rows,), self.cfg.decoder_start_token_id, dtype=torch.long, device=entry.device)
        self.free = list(range(rows))  # a heap: the lowest free slot first keeps live rows packed in front
        self.running: dict[int, GenRequest] = {}
        self.waiting: collections.deque[GenRequest] = collections.deque()
        self.beams: collections.deque[GenRequest] = collections.deque()
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"decode-{entry.name}", daemon=True)
        self._thread.start()

    # --- the app's side ----------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        """Queue `req`; QueueFull when `max_queued` requests wait already."""
        if req.params.max_new_tokens > self.max_len:
            raise InputError(f"max_new_tokens={req.params.max_new_tokens}; expected 1..{self.max_len}")
        with self._cv:
            if self._closing:
                raise QueueFull(f"model {self.entry.name!r} is being unloaded")
            if len(self.waiting) + len(self.beams) >= self.max_queued:
                self.stats.rejected += 1
                raise QueueFull(f"{self.max_queued} requests are queued on this replica")
            (self.beams if req.params.num_beams > 1 else self.waiting).append(req)
            self._cv.notify()

    def cancel(self, req: GenRequest) -> None:
        """Drop `req` (its row, or its place in the queue) at the next iteration."""
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    def close(self) -> None:
        """Finish what is queued and running, then stop the loop thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()

    def snapshot(self) -> dict[str, Any]:
        """Queue and cache figures for `/v1/stats`."""
        s = self.stats
        return {"queue_length": len(self.waiting) + len(self.beams), "running": len(self.running),
                "cache_rows": self.rows, "cache_rows_used": len(self.running), "cache_tokens": self.rows * self.max_len,
                "cache_tokens_used": sum(len(r.tokens) for r in list(self.running.values())),
                "cache_bytes": self.cache.nbytes, "tokens_generated": s.tokens,
                "tokens_per_s": round(s.tokens_per_s(), 2), "prefills": s.prefills, "beam_groups": s.beam_groups,
                "cancelled": s.cancelled, "rejected": s.rejected,
                "step_batch_sizes": {str(k): v for k, v in sorted(s.step_sizes.items())}}

    # --- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self.waiting or self.beams or self.running or self._closing):
                    self._cv.wait()
                if self._closing and not (self.waiting or self.beams or self.running):
                    return
                admit = []
                while self.waiting and len(admit) < len(self.free):
                    req = self.waiting.popleft()
                    if req.cancelled:
                        self.stats.cancelled += 1
                        continue
                    admit.append(req)
                beams = []
                while self.beams and len(beams) < self.rows:
                    req = self.beams.popleft()
                    if not req.cancelled:
                        beams.append(req)
            try:
                self._drop_cancelled()
                if admit:
                    self._admit(admit)
                if beams:
                    self._beam_group(beams)
                if self.running:
                    self._step()
            except Exception as e:  # a failing iteration fails its rows, never the loop
                log.exception("decode iteration of model %r failed", self.entry.name)
                for req in list(self.running.values()) + admit:
                    if req.state != "finished":
                        self._finish(req, error=e)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.running.values() if r.cancelled]:
            self.stats.cancelled += 1
            self._release(req)
            req.state = "finished"

    def _release(self, req: GenRequest) -> None:
        if req.slot >= 0:
            self.running.pop(req.slot, None)
            self.cache.release(req.slot)
            heapq.heappush(self.free, req.slot)
            req.slot = -1

    def _finish(self, req: GenRequest, error: Exception | None = None) -> None:
        self._release(req)
        req.state = "finished"
        if error is not None:
            req.emit("error", error)
        else:
            self.stats.requests += 1
            req.emit("done", Result(tokens=list(req.tokens), text=self.entry.tokenizer.decode(req.tokens),
                                    batch_size=req.batch_size))

    def _visual_tokens(self, reqs: list[GenRequest]) -> list[torch.Tensor | None]:
        """Projected visual tokens per request (feature cache first); None for a bad image.

        float[P, D] for a fixed-size tower. For a NaFlex tower (aspect ratio kept, a variable number of
        real patches padded to the budget) float[P, D + 1]: the last column is 1 for a real patch and 0 for
        padding, which the encoder masks (as `PaLI.encode` does).
        """
        model, size = self.entry.model, self.entry.image_size
        vcfg = model.cfg.vision
        out: list[torch.Tensor | None] = [None] * len(reqs)
        keys, todo, arrs = [], [], []
        for i, req in enumerate(reqs):
            key = (self.entry.name, hashlib.sha256(req.image).digest())
            keys.append(key)
            hit = self.features.get(key) if self.features is not None else None
            if hit is not None:
                out[i] = hit
                continue
            try:
                img = decode_image(req.image, req.max_image_pixels)
                arrs.append(naflex.image_input(vcfg, img) if vcfg.naflex else resize_rgb(img, size))
            except InputError as e:
                self._finish(req, error=e)
                continue
            todo.append(i)
        if todo:
            batch = np.stack(arrs) if vcfg.naflex else normalize_images(np.stack(arrs))
            pixels = torch.from_numpy(batch).to(self.entry.device, self.dtype)
            vis = model.projector(model.vision(pixels))  # (n, P, D)
            real = model.vision_tower.token_mask(pixels)  # (n, P) for NaFlex input, else None
            if real is not None:
                vis = torch.cat([vis, real.to(vis.dtype).unsqueeze(-1)], -1)
            for j, i in enumerate(todo):
                out[i] = vis[j]
                if self.features is not None:
                    self.features.put(keys[i], vis[j].clone())
        return out

    @torch.inference_mode()
    def _admit(self, reqs: list[GenRequest]) -> None:
        """Prefill: vision tower (cache misses), one encoder pass, cross-attention K/V into free slots."""
        text = self.entry.model.text
        vis = self._visual_tokens(reqs)
        ok = [(r, v) for r, v in zip(reqs, vis, strict=True) if v is not None]
        if not ok:
            return
        s = max(len(r.input_ids) for r, _ in ok)
        ids = torch.full((len(ok), s), self.cfg.pad_token_id, dtype=torch.long)
        for i, (r, _) in enumerate(ok):
            ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        mask = (ids != self.cfg.pad_token_id).long()
        for i, (r, _) in enumerate(ok):
            mask[i, : len(r.input_ids)] = 1  # a prompt may contain pad ids only as padding
        ids, mask = ids.to(self.entry.device), mask.to(self.entry.device)
        visual = torch.stack([v for _, v in ok]).to(self.dtype)  # (n, P, D) or (n, P, D + 1) for NaFlex
        if self.entry.model.cfg.vision.naflex:
            visual, vmask = visual[..., :-1], visual[..., -1].round().long().to(mask.device)
        else:
            vmask = torch.ones(visual.shape[:2], dtype=torch.long, device=mask.device)
        x = torch.cat([visual, text.embed(ids)], 1)
        enc_mask = torch.cat([vmask, mask], 1)
        enc = text.encoder(x, enc_mask)
        slots = [heapq.heappop(self.free) for _ in ok]
        try:
            self.cache.prefill(slots, enc, enc_mask)
        except Exception:
            for slot in slots:  # the rows were never taken
                heapq.heappush(self.free, slot)
            raise
        self.stats.prefills += 1
        for (r, _), slot in zip(ok, slots, strict=True):
            r.slot, r.state = slot, "running"
            self.running[slot] = r
            self.last[slot] = self.cfg.decoder_start_token_id
            if r.params.temperature > 0 and r.params.seed is not None:
                r.generator = torch.Generator(device=self.entry.device).manual_seed(r.params.seed)

    def _beam_group(self, reqs: list[GenRequest]) -> None:
        """Beam search as its own whole-call group (`serve.engine.decode_items`)."""
        items = [Item(self.entry, None, r.input_ids, DecodeParams(r.params.max_new_tokens, r.params.num_beams),
                      image=r.image, max_image_pixels=r.max_image_pixels) for r in reqs]
        results, _ = decode_items(items)
        self.stats.beam_groups += 1
        for r, res in zip(reqs, results, strict=True):
            if res.error is not None:
                self._finish(r, error=res.error)
            else:
                r.tokens, r.batch_size = res.tokens, res.batch_size
                self.stats.tokens += len(res.tokens)
                self._finish(r)

    @torch.inference_mode()
    def _step(self) -> None:
        """One token for every running row; finished rows are answered and freed at once."""
        n = len(self.running)
        b = bucket_for(max(self.running) + 1, self.rows)
        logits = self.cache.step(self.last[:b], b)  # (b, V)
        nxt = logits.argmax(-1)
        for slot, req in self.running.items():
            p = req.params
            if p.temperature > 0:
                probs = filter_logits(logits[slot:slot + 1], p.temperature, p.top_k, p.top_p).softmax(-1)
                nxt[slot] = torch.multinomial(probs, 1, generator=req.generator)[0, 0]
        self.last[:b] = nxt
        ids = nxt.tolist()
        now = time.perf_counter()
        self.stats.step_sizes[n] += 1
        self.stats.tokens += n
        self.stats.recent.append((time.time(), n))
        eos = self.cfg.eos_token_id
        for slot, req in list(self.running.items()):
            tok = ids[slot]
            req.tokens.append(tok)
            req.batch_size = max(req.batch_size, n)
            if req.first_token_s is None:
                req.first_token_s = now - req.submitted
            if tok == eos or len(req.tokens) >= req.params.max_new_tokens:
                self._finish(req)
            elif req.stream:
                req.emit("token", list(req.tokens))
