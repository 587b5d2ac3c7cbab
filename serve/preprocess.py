"""Safe image decoding and the model's image preprocessing for serving.

Model inputs come from the training pipeline's own `pali.data.pipeline.preprocess_image` (RGB, square
bicubic resize, (x/255 - 0.5)/0.5), so serving and training cannot drift apart; this module adds the
guards a public endpoint needs before any pixel is decoded.
"""

from __future__ import annotations

import binascii
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class InputError(ValueError):
    """A bad request input; `status` is the HTTP status to answer with (400, 404, 413, 422)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_base64(data: str) -> bytes:
    """Bytes of a base64 string (a `data:image/...;base64,` prefix is allowed)."""
    if not isinstance(data, str) or not data:
        raise InputError("image is empty; expected base64-encoded JPEG/PNG bytes")
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        # strict C-level check first (b64decode(validate=True) runs a Python regex over the whole string);
        # only a body with whitespace (line-wrapped base64) takes the slower path
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return binascii.a2b_base64("".join(data.split()), strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"image is not valid base64 ({e}); expected base64-encoded JPEG/PNG bytes") from None


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """A fully decoded RGB image from encoded bytes.

    Raises InputError for empty, non-image, truncated or corrupt bytes (400) and for images of more
    than `max_pixels` pixels (413), checked from the header before any pixel is decompressed.
    """
    if not data:
        raise InputError("image is empty; expected JPEG/PNG bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns between MAX_IMAGE_PIXELS and twice that (and raises above): our own check on the
            # header's size below replaces the warning with an error that names the limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise InputError(f"image is {w}x{h} = {w * h} pixels; expected at most {max_pixels}", 413)
            if w < 1 or h < 1:
                raise InputError(f"image is {w}x{h}; expected a non-empty image")
            img.load()
            return to_rgb(img)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"image is too large to decode ({e}); expected at most {max_pixels} pixels", 413) from None
    except UnidentifiedImageError:
        raise InputError(f"image bytes are not a recognised image format ({len(data)} bytes starting "
                         f"{data[:8]!r}); expected JPEG, PNG, WebP, GIF or BMP") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"image is truncated or corrupt ({e}); expected a complete JPEG/PNG file") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB of an image as people send it: EXIF orientation applied, transparency over white, 16-bit and
    float grayscale scaled to 8 bits, palette / CMYK / grayscale converted (an animated GIF's first frame)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess_image(img: Image.Image, image_size: int) -> np.ndarray:
    """float32[3, image_size, image_size] in [-1, 1]: the model input for one decoded image (as in training)."""
    from pali.data.pipeline import preprocess_image as pipeline_preprocess

    return pipeline_preprocess(img, image_size)
