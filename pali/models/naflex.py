"""SigLIP 2 NaFlex: images at their native aspect ratio, as a variable number of patches up to a budget.

Reference: Tschannen et al. 2025 (SigLIP 2), section 2.4, and Hugging Face's `Siglip2ImageProcessor` /
`Siglip2VisionEmbeddings`, which this module follows step for step:

1. `target_size`: the largest size whose sides are multiples of the patch size, whose aspect ratio is the
   image's (up to rounding each side up to a whole patch) and which has at most `max_num_patches` patches.
2. `resize_image` (bilinear) and `patchify`: the image as flattened patches float[h*w, p*p*C], row-major
   over the patch grid, each patch in (row, column, channel) order.
3. `resize_position_embeddings`: the square grid of learned position embeddings resized (bilinear,
   antialiased) to each image's own (h, w) patch grid.

Transport format. Every NaFlex image travels through the system (data pipeline, training loop, serving
batches, evaluation) as one fixed-shape tensor `packed: float[1 + N, p*p*C]` with N = max_num_patches:
row 0 is a header holding the patch grid (h, w) as base-16 digits (small integers, exact in fp16 and
bf16, so the header survives any dtype cast), rows 1..h*w the patches, the rest zero padding. A batch is
float[B, 1 + N, p*p*C] and stacks like square images do; `unpack` returns the patches and
`spatial_shapes` int[B, 2] that `Siglip2VisionModel` takes, and `patch_mask` the padding mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_DIGITS = 4  # base-16 digits per side in the header: grids up to 65535 patches per side


def target_size(height: int, width: int, patch_size: int, max_num_patches: int, eps: float = 1e-5
                ) -> tuple[int, int]:
    """(height, width) in pixels an image is resized to: sides multiples of `patch_size`, at least one
    patch each, at most `max_num_patches` patches, aspect ratio kept. The binary search over the scale
    of SigLIP 2's image processor (`get_image_size_for_max_num_patches`), so sizes match it exactly."""
    if height < 1 or width < 1:
        raise ValueError(f"image is {height}x{width}; expected positive sides")
    if max_num_patches < 1:
        raise ValueError(f"max_num_patches is {max_num_patches}; expected >= 1")

    def scaled(scale: float, size: int) -> int:
        return max(patch_size, int(math.ceil(size * scale / patch_size) * patch_size))

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (scaled(mid, height) / patch_size) * (scaled(mid, width) / patch_size) <= max_num_patches:
            lo = mid
        else:
            hi = mid
    return scaled(lo, height), scaled(lo, width)


def resize_image(img: Image.Image, patch_size: int, max_num_patches: int) -> Image.Image:
    """The image in RGB, bilinear-resized (PIL, antialiased) to `target_size`: aspect ratio kept."""
    img = img.convert("RGB")
    h, w = target_size(img.height, img.width, patch_size, max_num_patches)
    return img if (img.height, img.width) == (h, w) else img.resize((w, h), Image.Resampling.BILINEAR)


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """float[C, H, W] (sides multiples of patch_size) -> float[h*w, p*p*C], patches row-major, each in
    (row, column, channel) order as SigLIP 2's processor flattens them."""
    c, hh, ww = image.shape
    if hh % patch_size or ww % patch_size:
        raise ValueError(f"image is {c}x{hh}x{ww}; expected sides that are multiples of the patch size "
                         f"{patch_size}")
    h, w = hh // patch_size, ww // patch_size
    x = image.reshape(c, h, patch_size, w, patch_size).permute(1, 3, 2, 4, 0)  # (h, w, p, p, C)
    return x.reshape(h * w, patch_size * patch_size * c)


def pack(patches: torch.Tensor, grid: tuple[int, int], max_num_patches: int) -> torch.Tensor:
    """float[h*w, D] patches of an (h, w) grid -> the transport tensor float[1 + max_num_patches, D]."""
    h, w = grid
    n, d = patches.shape
    if n != h * w:
        raise ValueError(f"{n} patches for a {h}x{w} grid; expected {h * w}")
    if n > max_num_patches:
        raise ValueError(f"{h}x{w} = {n} patches; expected at most max_num_patches {max_num_patches}")
    if d < 2 * _DIGITS:
        raise ValueError(f"patches of {d} values cannot hold the header; expected at least {2 * _DIGITS}")
    out = patches.new_zeros(1 + max_num_patches, d)
    out[0, :2 * _DIGITS] = torch.tensor(_digits(h) + _digits(w), dtype=patches.dtype)
    out[1:1 + n] = patches
    return out


def _digits(v: int) -> list[int]:
    if not 0 < v < 16 ** _DIGITS:
        raise ValueError(f"patch grid side {v}; expected 1..{16 ** _DIGITS - 1}")
    return [(v >> (4 * i)) & 15 for i in range(_DIGITS)]


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float[B, 1 + N, D] -> (patches float[B, N, D], spatial_shapes int64[B, 2] as (rows, columns)).

    A header that is not a valid grid (not small integers, or more patches than N) is a ValueError: the
    tensor is then not a NaFlex batch (e.g. square images given to a NaFlex tower)."""
    if packed.dim() != 3 or packed.shape[1] < 2 or packed.shape[2] < 2 * _DIGITS:
        raise ValueError(f"NaFlex pixel_values are {tuple(packed.shape)}; expected float[B, 1 + N, p*p*C] "
                         "(see pali.models.naflex.pack) or an image float[B, C, H, W]")
    head = packed[:, 0, :2 * _DIGITS].float()
    digits = head.round()
    if not torch.equal(digits, head) or (digits < 0).any() or (digits > 15).any():
        raise ValueError("NaFlex pixel_values have no valid header row; expected tensors made by "
                         "pali.models.naflex.pack / preprocess")
    weights = torch.tensor([16 ** i for i in range(_DIGITS)], dtype=torch.long, device=packed.device)
    d = digits.long().view(-1, 2, _DIGITS)
    spatial = (d * weights).sum(-1)  # (B, 2)
    n = packed.shape[1] - 1
    counts = spatial.prod(-1)
    if (spatial < 1).any() or (counts > n).any():
        raise ValueError(f"NaFlex header grids {spatial.tolist()}; expected 1..{n} patches each")
    return packed[:, 1:], spatial


def patch_mask(spatial_shapes: torch.Tensor, num_patches: int) -> torch.Tensor:
    """bool[B, N]: True on each image's h*w real patches (the first ones), False on padding."""
    real = spatial_shapes.prod(-1, keepdim=True)  # (B, 1)
    return torch.arange(num_patches, device=spatial_shapes.device)[None, :] < real


def preprocess(image: bytes | Image.Image, patch_size: int, max_num_patches: int,
               mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> np.ndarray:
    """Decode (if bytes), resize keeping the aspect ratio within the patch budget, normalise, patchify and
    pack -> float32[1 + max_num_patches, p*p*3]. What the data pipeline, evaluation and serving call for a
    NaFlex tower, in place of the square resize."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        import io

        image = Image.open(io.BytesIO(bytes(image)))
    img = resize_image(image, patch_size, max_num_patches)
    x = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)
    grid = (t.shape[1] // patch_size, t.shape[2] // patch_size)
    return pack(patchify(t, patch_size), grid, max_num_patches).numpy()


def blank_like(pixels: np.ndarray) -> np.ndarray:
    """The pixels of a text-only example: zeros, keeping a packed image's header (a valid grid)."""
    out = np.zeros_like(pixels)
    if pixels.ndim == 2:  # packed float[1 + N, p*p*C]
        out[0] = pixels[0]
    return out


def image_input(vision_cfg, image: bytes | Image.Image, mean: Sequence[float] = (0.5, 0.5, 0.5),
                std: Sequence[float] = (0.5, 0.5, 0.5)) -> np.ndarray:
    """One image as the tower of `vision_cfg` (a `VisionConfig`) reads it: packed NaFlex patches
    float32[1 + N, p*p*3] (aspect ratio kept) for a NaFlex tower, else the square float32[3, S, S] of
    `pali.data.pipeline.preprocess_image`. Stack a list of these for a batch."""
    if vision_cfg.naflex:
        return preprocess(image, vision_cfg.patch_size, vision_cfg.max_num_patches, mean, std)
    from pali.data.pipeline import preprocess_image

    return preprocess_image(image, vision_cfg.image_size, mean, std)


def pack_images(images: torch.Tensor | Sequence[torch.Tensor], patch_size: int, max_num_patches: int
                ) -> torch.Tensor:
    """Normalised images float[C, H, W] (sides multiples of patch_size, sizes may differ) -> one packed
    batch float[B, 1 + N, p*p*C]."""
    out = []
    for im in images:
        out.append(pack(patchify(im, patch_size), (im.shape[1] // patch_size, im.shape[2] // patch_size),
                        max_num_patches))
    return torch.stack(out)


def packed_shape(channels: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """Shape of one packed image: (1 + max_num_patches, patch_size**2 * channels)."""
    return 1 + max_num_patches, patch_size * patch_size * channels


def resize_position_embeddings(grid: torch.Tensor, spatial_shapes: torch.Tensor, num_patches: int
                               ) -> torch.Tensor:
    """Position embeddings float[G, G, D] resized to each image's patch grid -> float[B, N, D].

    Bilinear with antialiasing (align_corners=False) per image, as `Siglip2VisionEmbeddings`; padding
    positions take the image's first position embedding, as the reference does (they are masked anyway).
    """
    d = grid.shape[-1]
    src = grid.permute(2, 0, 1)[None].float()  # (1, D, G, G)
    out = grid.new_empty(spatial_shapes.shape[0], num_patches, d)
    cache: dict[tuple[int, int], torch.Tensor] = {}
    for i, (h, w) in enumerate(spatial_shapes.tolist()):
        if (h, w) not in cache:
            r = F.interpolate(src, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            cache[(h, w)] = r[0].reshape(d, h * w).transpose(0, 1).to(grid.dtype)  # (h*w, D)
        r = cache[(h, w)]
        out[i, :h * w] = r
        out[i, h * w:] = r[0]
    return out
