"""Request preparation and batched decoding, independent of Ray and HTTP.

A request becomes an `Item` (pixels, prompt ids, decoding parameters, model); `decode_items` groups
items that share a model and decoding parameters and runs one batched encoder pass and one batched
KV-cache decode per group, so every answer equals what decoding that request alone gives.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pali.data.pipeline import normalize_images, resize_rgb
from pali.data.prompts import build_prompt, check_lang
from pali.models import naflex
from serve.config import TASKS
from serve.preprocess import InputError, decode_image


@dataclass
class LoadedModel:
    """One serving checkpoint loaded in a replica."""

    name: str
    """Name the API knows it by."""
    model: torch.nn.Module
    """The PaLI model in eval mode."""
    tokenizer: object
    """Its `pali.tokenizer.Tokenizer`."""
    device: str = "cpu"
    """Where the weights live."""
    prompt_ids: dict[str, list[int]] = field(default_factory=dict, repr=False)
    """Cache prompt -> token ids (eos included): caption/ocr prompts are one per language, so most requests
    skip the tokenizer; bounded by `PROMPT_CACHE_SIZE`."""

    @property
    def image_size(self) -> int:
        """Input resolution of the vision tower."""
        return self.model.cfg.vision.image_size

    @property
    def max_text_len(self) -> int:
        """Longest prompt (tokens, eos included) the model accepts."""
        return self.model.cfg.max_text_len


def load_model(name: str, ckpt_dir: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a serving checkpoint (safetensors + json + sentencepiece; no pickle)."""
    from pali import storage
    from pali.serving_checkpoint import load_pretrained

    ckpt_dir = str(storage.local_checkpoint(ckpt_dir))  # a URI is served from a cached local copy
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint of model {name!r} not found at {ckpt_dir}")
    torch_dtype = None if device == "cpu" or dtype == "float32" else getattr(torch, dtype)
    try:
        model, tok = load_pretrained(ckpt_dir, device=device, dtype=torch_dtype)
    except Exception as e:  # name the checkpoint: library errors (safetensors) often do not
        raise RuntimeError(f"loading checkpoint {ckpt_dir} of model {name!r} failed: {e}") from e
    return LoadedModel(name=name, model=model.eval(), tokenizer=tok, device=device)


@dataclass(frozen=True)
class DecodeParams:
    """Decoding parameters; requests are batched together only when these are equal."""

    max_new_tokens: int
    """Most tokens generated."""
    num_beams: int = 1
    """Beam width (1 = greedy or sampling)."""
    temperature: float = 0.0
    """0 = greedy / beam search; > 0 = sampling at this temperature."""
    top_k: int = 0
    """Sampling among the k likeliest tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""

    def generate_kwargs(self) -> dict:
        """Keyword arguments of `model.generate`."""
        sample = self.temperature > 0
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": sample,
                "temperature": self.temperature if sample else 1.0, "top_k": self.top_k if sample else 0,
                "top_p": self.top_p if sample else 1.0}


@dataclass
class Item:
    """One prepared request waiting in a batch."""

    entry: LoadedModel
    """Model that answers it."""
    pixels: np.ndarray | None
    """float32[3, H, W] preprocessed image, or None: `image` is decoded with the rest of its batch."""
    input_ids: list[int]
    """Prompt token ids, eos included."""
    params: DecodeParams
    """Decoding parameters."""
    image: bytes | None = None
    """Encoded JPEG/PNG/... bytes, used when `pixels` is None (decoded and resized in `decode_items`, off
    the event loop, once per batch instead of one thread hop per request)."""
    max_image_pixels: int = 25_000_000
    """Largest decoded image (width*height) accepted for `image`."""


@dataclass
class Result:
    """A decoded answer (or the error of its group) and the size of the batch it was decoded in."""

    tokens: list[int] = field(default_factory=list)
    """Generated ids up to and including eos, padding removed."""
    text: str = ""
    """Decoded text."""
    batch_size: int = 0
    """Requests decoded in the same generate call."""
    error: Exception | None = None
    """Set when decoding the group failed."""


def check_params(max_new_tokens: int, num_beams: int, temperature: float, *, max_new_tokens_limit: int,
                 max_beams: int, max_temperature: float, top_k: int = 0, top_p: float = 1.0) -> DecodeParams:
    """Validated `DecodeParams`; InputError naming the bad value and its allowed range otherwise."""
    if not 1 <= max_new_tokens <= max_new_tokens_limit:
        raise InputError(f"max_new_tokens={max_new_tokens}; expected 1..{max_new_tokens_limit}")
    if not 1 <= num_beams <= max_beams:
        raise InputError(f"num_beams={num_beams}; expected 1..{max_beams}")
    if not (0.0 <= temperature <= max_temperature) or temperature != temperature:
        raise InputError(f"temperature={temperature}; expected 0 (greedy) .. {max_temperature}")
    if temperature > 0 and num_beams > 1:
        raise InputError(f"temperature={temperature} with num_beams={num_beams}; sampling needs num_beams=1 "
                         "(use temperature=0 for beam search)")
    if top_k < 0:
        raise InputError(f"top_k={top_k}; expected >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p={top_p}; expected 0 < top_p <= 1")
    return DecodeParams(max_new_tokens, num_beams, float(temperature), int(top_k), float(top_p))


def make_prompt(task: str, lang: str, prompt: str | None) -> str:
    """The training prompt of `task` in `lang`; `prompt` is the question (vqa) or the whole prompt (raw)."""
    if task not in TASKS:
        raise InputError(f"unsupported task {task!r}; expected one of {list(TASKS)}")
    try:
        check_lang(lang)  # pali.data.prompts decides which tags are registered; its ValueError is a 400
    except ValueError as e:
        raise InputError(str(e)) from None
    if task == "raw":
        if not prompt:
            raise InputError("task 'raw' needs a non-empty prompt")
        return prompt
    if task == "vqa" and not prompt:
        raise InputError("task 'vqa' needs the question in 'prompt'")
    if task != "vqa" and prompt:
        raise InputError(f"task {task!r} takes no prompt (it is built from task and lang); use task 'raw' "
                         "to send a prompt verbatim")
    try:
        return build_prompt("vqa", lang, question=prompt) if task == "vqa" else build_prompt(task, lang)
    except ValueError as e:  # e.g. a language tag without registered templates: the client's input
        raise InputError(str(e)) from None


PROMPT_CACHE_SIZE = 4096
"""Most prompts whose token ids one loaded model keeps (the cache is cleared when full)."""


def encode_prompt(entry: LoadedModel, prompt: str) -> list[int]:
    """Prompt ids with eos (cached per model); InputError if longer than the model's `max_text_len`."""
    ids = entry.prompt_ids.get(prompt)
    if ids is None:
        ids = entry.tokenizer.encode(prompt, add_eos=True)
        if len(entry.prompt_ids) >= PROMPT_CACHE_SIZE:
            entry.prompt_ids.clear()
        entry.prompt_ids[prompt] = ids
    if len(ids) > entry.max_text_len:
        raise InputError(f"prompt is {len(ids)} tokens; model {entry.name!r} accepts at most "
                         f"{entry.max_text_len}")
    return ids


def trim(ids: list[int], eos: int = 1, pad: int = 0) -> list[int]:
    """Generated ids up to and including the first eos, without trailing padding."""
    if eos in ids:
        return ids[: ids.index(eos) + 1]
    while ids and ids[-1] == pad:
        ids = ids[:-1]
    return ids


@torch.no_grad()
def decode_group(entry: LoadedModel, items: list[Item]) -> list[list[int]]:
    """One batched encoder pass + one batched KV-cache decode for items sharing model and params."""
    model, cfg = entry.model, entry.model.cfg.text
    params = items[0].params
    dtype = next(model.parameters()).dtype
    pixels = torch.from_numpy(np.stack([it.pixels for it in items])).to(entry.device, dtype)  # (B, 3, H, W)
    s = max(len(it.input_ids) for it in items)
    ids_np = np.full((len(items), s), cfg.pad_token_id, dtype=np.int64)  # (B, S), right-padded
    for i, it in enumerate(items):
        ids_np[i, : len(it.input_ids)] = it.input_ids
    lens = np.array([len(it.input_ids) for it in items])
    ids = torch.from_numpy(ids_np)
    mask = torch.from_numpy((np.arange(s)[None, :] < lens[:, None]).astype(np.int64))  # (B, S)
    out = model.generate(pixels, ids.to(entry.device), mask.to(entry.device), **params.generate_kwargs())
    return [trim(row, cfg.eos_token_id, cfg.pad_token_id) for row in out.cpu().tolist()]


def prepare_pixels(items: list[Item]) -> list[Result | None]:
    """Decode and resize the encoded `image` of every item without `pixels`, normalising each model's
    images in one vectorised step; sets `pixels`. Returns, per item, a Result carrying the InputError of
    an image that cannot be decoded (that item alone fails, with a 4xx) or None."""
    errors: list[Result | None] = [None] * len(items)
    todo: dict[int, tuple[list[int], list[np.ndarray]]] = {}  # model -> (item indices, images)
    for i, it in enumerate(items):
        if it.pixels is not None:
            continue
        try:
            img = decode_image(it.image or b"", it.max_image_pixels)
            vision = it.entry.model.cfg.vision
            if vision.naflex:  # aspect ratio kept: packed patches float32[1 + N, p*p*3], already normalised
                it.pixels = naflex.image_input(vision, img)
                continue
            arr = resize_rgb(img, it.entry.image_size)  # (H, W, 3) uint8
        except InputError as e:
            errors[i] = Result(error=e)
            continue
        idx, arrs = todo.setdefault(id(it.entry), ([], []))
        idx.append(i)
        arrs.append(arr)
    for idx, arrs in todo.values():
        pixels = normalize_images(np.stack(arrs))  # (B, 3, H, W)
        for i, px in zip(idx, pixels, strict=True):
            items[i].pixels = px
    return errors


def decode_items(items: list[Item]) -> tuple[list[Result], list[int]]:
    """Results in input order, and the size of every generate call made (for batching statistics).

    Items carrying encoded image bytes are decoded here first (`prepare_pixels`); one whose image is bad
    gets a Result with its InputError and takes no part in decoding."""
    prepared = prepare_pixels(items)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        if prepared[i] is None:
            groups[(id(it.entry), it.params)].append(i)
    results: list[Result] = [r if r is not None else Result() for r in prepared]
    sizes = []
    for idx in groups.values():
        entry = items[idx[0]].entry
        sizes.append(len(idx))
        try:
            outs = decode_group(entry, [items[i] for i in idx])
        except Exception as e:  # one failing group must not fail the other requests of the batch
            for i in idx:
                results[i] = dataclasses.replace(results[i], error=e, batch_size=len(idx))
            continue
        for i, toks in zip(idx, outs, strict=True):
            results[i] = Result(tokens=toks, text=entry.tokenizer.decode(toks), batch_size=len(idx))
    return results, sizes


class BatchStats:
    """Counts of generate calls by batch size (what `/v1/stats` reports)."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = defaultdict(int)
        self.requests = 0
        self.failures = 0
        self.unbatched_alone = 0
        """Requests decoded at once because nothing else was in flight (no batch wait)."""
        self.started = time.time()

    def record_request(self, batch_size: int) -> None:
        """Add one request answered by the decode loop, with the most rows it shared a step with."""
        self.sizes[batch_size] += 1
        self.requests += 1

    def record(self, sizes: list[int]) -> None:
        """Add the batch sizes of one `decode_items` call."""
        for s in sizes:
            self.sizes[s] += 1
            self.requests += s

    def as_dict(self) -> dict:
        """JSON form."""
        return {"requests": self.requests, "batches": sum(self.sizes.values()),
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
                "max_batch_size_seen": max(self.sizes, default=0), "failures": self.failures,
                "unbatched_alone": self.unbatched_alone,
                "uptime_s": round(time.time() - self.started, 3)}
