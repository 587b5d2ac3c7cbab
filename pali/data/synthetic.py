"""A learnable synthetic WebLI-style corpus: procedural scenes with multilingual captions, VQA and OCR.

Each example is a 3x3-cell scene of 1-3 objects (6 shapes x 6 colours, 1-2 groups with distinct shapes
and colours) on a light background; half of the scenes also carry a sign with a short word in the
example's language and script (bottom row), rendered with Noto fonts and Pillow's RAQM layout (proper
Arabic joining, Devanagari conjuncts, CJK). Text comes from `lexicon.py`: an alt-text caption, one
question/answer pair (count, colour or shape), the sign's word as `ocr_text`, and image-level labels
(`shape:star`, `colour:red`, `count:3`, `text:<word>`) for the vision tower's classification pretraining.

Every example depends only on (seed, index), so any shard can be regenerated alone; a held-out set is
the same call with another seed.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from pali.data.lexicon import COLOURS, GRAMMARS, SHAPES, Group
from pali.data.prompts import SYNTHETIC_LANGS
from pali.data.schema import SHARD_SUFFIXES, write_shard

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 230),
    "yellow": (240, 200, 0), "purple": (140, 40, 180), "orange": (255, 130, 0),
}
_SUPERSAMPLE = 4
_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts"))
# (font file, face index in a .ttc); CJK collections hold JP, KR, SC, TC, HK faces in this order.
_FONT_FOR_LANG: dict[str, tuple[str, int]] = {
    "ar": ("NotoSansArabic-Bold.ttf", 0), "hi": ("NotoSansDevanagari-Bold.ttf", 0),
    "ja": ("NotoSansCJK-Bold.ttc", 0), "ko": ("NotoSansCJK-Bold.ttc", 1), "zh": ("NotoSansCJK-Bold.ttc", 2),
}
_LATIN_FONT = ("NotoSans-Bold.ttf", 0)


@cache
def _find_font_file(name: str) -> str | None:
    for root in _FONT_DIRS:
        for dirpath, _, files in os.walk(root):
            if name in files:
                return os.path.join(dirpath, name)
    return None


@cache
def font_for(lang: str, size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A Noto font for `lang`'s script at `size` px; Pillow's default font (with a warning) if missing."""
    name, index = _FONT_FOR_LANG.get(lang, _LATIN_FONT)
    path = _find_font_file(name)
    if path is None:
        warnings.warn(f"font {name} for language {lang!r} not found under {_FONT_DIRS}; OCR words are "
                      "drawn with Pillow's default font (non-Latin glyphs will be missing). Install them "
                      "with: apt-get install -y fonts-noto-core fonts-noto-cjk", stacklevel=2)
        return ImageFont.load_default(size)
    if not features.check("raqm"):
        warnings.warn("Pillow has no RAQM layout: Arabic and Devanagari text will be shaped incorrectly",
                      stacklevel=2)
        return ImageFont.truetype(path, size, index=index, layout_engine=ImageFont.Layout.BASIC)
    return ImageFont.truetype(path, size, index=index, layout_engine=ImageFont.Layout.RAQM)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        r *= 0.85
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "heart":  # parametric heart curve, scaled into the cell
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * r / 17, cy - y * r / 17 - r * 0.1))
        return pts
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: float) -> None:
    fill = RGB[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=fill)


def _draw_sign(img: Image.Image, word: str, lang: str, box: tuple[int, int, int, int]) -> None:
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=(255, 255, 255), outline=(40, 40, 40), width=max(1, _SUPERSAMPLE))
    pad = 2 * _SUPERSAMPLE
    max_w, max_h = x1 - x0 - 2 * pad, y1 - y0 - 2 * pad
    size = max_h
    while size > 6:  # largest size that fits the sign
        font = font_for(lang, size)
        x_0, y_0, x_1, y_1 = draw.textbbox((0, 0), word, font=font)
        if x_1 - x_0 <= max_w and y_1 - y_0 <= max_h:
            break
        size = int(size * 0.9)
    font = font_for(lang, size)
    x_0, y_0, x_1, y_1 = draw.textbbox((0, 0), word, font=font)
    draw.text(((x0 + x1 - (x_1 - x_0)) / 2 - x_0, (y0 + y1 - (y_1 - y_0)) / 2 - y_0), word, font=font, fill=(0, 0, 0))


def sample_scene(rng: np.random.Generator) -> tuple[list[Group], bool]:
    """Random groups (1-2 groups, 1-3 objects in all, distinct shapes/colours) and whether a sign is drawn."""
    two = rng.random() < 0.5
    counts = [(1, 1), (1, 2), (2, 1)][rng.integers(3)] if two else (int(rng.integers(1, 4)),)
    shapes = rng.choice(len(SHAPES), size=len(counts), replace=False)
    colours = rng.choice(len(COLOURS), size=len(counts), replace=False)
    groups = [Group(SHAPES[s], COLOURS[c], n) for s, c, n in zip(shapes, colours, counts, strict=True)]
    return groups, bool(rng.random() < 0.5)


def render_scene(groups: list[Group], word: str | None, lang: str, rng: np.random.Generator,
                 image_size: int = 64) -> Image.Image:
    """Draw the scene at 4x and downsample (anti-aliased) to `image_size` px square."""
    s = image_size * _SUPERSAMPLE
    cell = s / 3
    base = 225 + int(rng.integers(0, 25))
    img = Image.new("RGB", (s, s), (base, base, base - int(rng.integers(0, 15))))
    draw = ImageDraw.Draw(img)
    rows = 2 if word else 3
    cells = rng.permutation(3 * rows)
    k = 0
    for g in groups:
        for _ in range(g.count):
            row, col = divmod(int(cells[k]), 3)
            k += 1
            jx, jy = rng.uniform(-0.08, 0.08, size=2) * cell
            r = cell * rng.uniform(0.36, 0.44)
            _draw_object(draw, g.shape, g.colour, (col + 0.5) * cell + jx, (row + 0.5) * cell + jy, r)
    if word:
        m = int(cell * 0.05)
        _draw_sign(img, word, lang, (m, int(2 * cell) + m, s - m, s - m))
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def image_labels(groups: list[Group], word: str | None) -> list[str]:
    """The scene's image-level labels (what a JFT-style classifier is trained on): every shape and colour
    present, the number of objects, and the sign's word."""
    labels = {f"shape:{g.shape}" for g in groups} | {f"colour:{g.colour}" for g in groups}
    labels.add(f"count:{sum(g.count for g in groups)}")
    if word:
        labels.add(f"text:{word}")
    return sorted(labels)


def _sample(index: int, seed: int, langs: tuple[str, ...]) -> tuple[dict[str, Any], list[Group]]:
    rng = np.random.default_rng([seed, index])
    lang = langs[index % len(langs)]  # round robin: every language equally often, even in tiny sets
    gram = GRAMMARS[lang]
    groups, has_sign = sample_scene(rng)
    word = gram.ocr_words[int(rng.integers(len(gram.ocr_words)))] if has_sign else None
    g = groups[int(rng.integers(len(groups)))]
    kind = int(rng.integers(3))
    if kind == 0:
        question, answer = gram.q_count(g.shape), str(g.count)
    elif kind == 1:
        question, answer = gram.q_colour(g.shape, g.count), gram.a_colour(g.colour)
    else:
        question, answer = gram.q_shape(g.colour), gram.a_shape(g.shape)
    row = {"id": f"syn{seed}-{index:08d}", "lang": lang, "text": gram.caption(groups), "question": question,
           "answer": answer, "ocr_text": word, "task": None, "captions": None, "answers": None,
           "image_labels": image_labels(groups, word)}
    return row, groups


def make_texts(index: int, seed: int = 0, langs: Sequence[str] | None = None) -> dict[str, Any]:
    """The text fields of example `index` (no image rendered): what `make_example` returns minus `image`."""
    return _sample(index, seed, tuple(langs or SYNTHETIC_LANGS))[0]


def make_example(index: int, seed: int = 0, langs: Sequence[str] | None = None,
                 image_size: int = 64) -> dict[str, Any]:
    """Example `index` of the corpus with `seed`: a schema row (PNG bytes + text fields)."""
    row, groups = _sample(index, seed, tuple(langs or SYNTHETIC_LANGS))
    img = render_scene(groups, row["ocr_text"], row["lang"], np.random.default_rng([seed, index, 1]), image_size)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {**row, "image": buf.getvalue()}


def _write_one(args: tuple) -> str:
    out_dir, prefix, k, start, stop, seed, langs, image_size, fmt = args
    rows = [make_example(i, seed, langs, image_size) for i in range(start, stop)]
    return write_shard(rows, f"{out_dir.rstrip('/')}/{prefix}-{k:05d}{SHARD_SUFFIXES[fmt]}", fmt)


def write_synthetic_shards(out_dir: str, num_examples: int, langs: Sequence[str] | None = None, seed: int = 0,
                           examples_per_shard: int = 256, fmt: str = "parquet", image_size: int = 64,
                           prefix: str | None = None, num_workers: int = 1) -> list[str]:
    """Generate `num_examples` examples into shards under `out_dir` (local path or URI); returns the paths.

    `langs` defaults to all of `SYNTHETIC_LANGS`; `fmt` is "parquet" or "webdataset". Deterministic per
    `seed` (shard k holds examples k*examples_per_shard ...): the same arguments give identical shards
    whatever `num_workers` (processes) is.
    """
    langs = tuple(langs or SYNTHETIC_LANGS)
    bad = [lang for lang in langs if lang not in GRAMMARS]
    if bad:
        raise ValueError(f"no synthetic grammar for languages {bad}; expected some of {list(GRAMMARS)}")
    if fmt not in SHARD_SUFFIXES:
        raise ValueError(f"unknown shard format {fmt!r}; expected one of {sorted(SHARD_SUFFIXES)}")
    if num_examples < 1 or examples_per_shard < 1:
        raise ValueError(f"num_examples={num_examples}, examples_per_shard={examples_per_shard}; expected >= 1")
    if image_size < 16:
        raise ValueError(f"image_size={image_size}; expected >= 16")
    prefix = prefix or f"synthetic-s{seed}"
    jobs = [(out_dir, prefix, k, start, min(start + examples_per_shard, num_examples), seed, langs, image_size,
             fmt) for k, start in enumerate(range(0, num_examples, examples_per_shard))]
    if num_workers <= 1 or len(jobs) == 1:
        return [_write_one(j) for j in jobs]
    with ProcessPoolExecutor(num_workers) as pool:
        return list(pool.map(_write_one, jobs))
