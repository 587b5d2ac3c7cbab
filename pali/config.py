"""Typed configs and the named model presets.

Sizes follow the papers: ViT-G/14 and ViT-e/14 from Zhai et al. 2022 / Chen et al. 2022 (PaLI,
table 1), mT5 from Xue et al. 2021, SigLIP So400m from Zhai et al. 2023. A run overrides a preset with
`with_overrides`, it never re-lists one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class VisionConfig:
    """Vision tower (ViT / SigLIP) hyper-parameters."""

    image_size: int = 224
    """Input resolution in pixels (square)."""
    patch_size: int = 14
    """Side of a square patch in pixels."""
    width: int = 768
    """Hidden size of the transformer."""
    depth: int = 12
    """Number of transformer blocks."""
    mlp_dim: int = 3072
    """Hidden size of the MLP inside each block."""
    num_heads: int = 12
    """Attention heads per block."""
    channels: int = 3
    """Image channels expected by the patch embedding."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon (1e-12 for Hugging Face ViT, 1e-6 for SigLIP)."""
    activation: Literal["gelu", "gelu_tanh"] = "gelu_tanh"
    """MLP activation: exact GELU (original ViT) or its tanh approximation (SigLIP)."""
    class_token: bool = False
    """Prepend a learned class token (original ViT layout); PaLI uses every token, no pooling."""
    layout: Literal["vit", "siglip", "siglip2"] = "siglip"
    """Which checkpoint layout the tower imports from / exports to (siglip2: `Siglip2VisionModel`, NaFlex)."""
    naflex: bool = False
    """SigLIP 2 NaFlex: images keep their aspect ratio, as up to `max_num_patches` patches (pali.models.naflex);
    `image_size` then only sets the square grid of position embeddings that is resized to each image."""
    max_num_patches: int = 256
    """NaFlex patch budget per image (SigLIP 2's `max_num_patches`): the visual sequence length."""

    @property
    def pos_grid(self) -> int:
        """Side of the square grid of learned position embeddings (image_size / patch_size)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image: at `image_size`, or the NaFlex budget (padding included)."""
        return self.max_num_patches if self.naflex else self.pos_grid ** 2

    @property
    def num_tokens(self) -> int:
        """Visual tokens per image, class token included."""
        return self.num_patches + int(self.class_token)


@dataclass
class TextConfig:
    """mT5 / T5 encoder-decoder hyper-parameters (Hugging Face `T5Config` names where they exist)."""

    vocab_size: int = 250112
    """Rows of the token embedding and of the output head."""
    d_model: int = 512
    """Hidden size."""
    d_kv: int = 64
    """Size of one attention head."""
    d_ff: int = 1024
    """Hidden size of the feed-forward block."""
    num_heads: int = 6
    """Attention heads per block."""
    num_layers: int = 8
    """Encoder blocks."""
    num_decoder_layers: int = 8
    """Decoder blocks."""
    relative_attention_num_buckets: int = 32
    """Buckets of the relative position bias."""
    relative_attention_max_distance: int = 128
    """Distance beyond which relative positions share the last bucket."""
    feed_forward_proj: Literal["gated-gelu", "relu"] = "gated-gelu"
    """Gated-GELU (T5 v1.1 / mT5) or ReLU (T5 v1.0) feed-forward."""
    tie_word_embeddings: bool = False
    """Share the output head with the embedding and scale by d_model**-0.5 (T5 v1.0)."""
    layer_norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    dropout_rate: float = 0.0
    """Dropout after attention / feed-forward (0 in PaLI pretraining)."""
    pad_token_id: int = 0
    """Padding id (also the decoder start token)."""
    eos_token_id: int = 1
    """End-of-sequence id."""
    decoder_start_token_id: int = 0
    """First decoder input."""

    @property
    def inner_dim(self) -> int:
        """num_heads * d_kv, the width of q/k/v."""
        return self.num_heads * self.d_kv


@dataclass
class PaLIConfig:
    """A whole PaLI model: vision tower + projection + encoder-decoder."""

    name: str = "custom"
    """Preset this config came from (recorded in checkpoints)."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The vision tower."""
    text: TextConfig = field(default_factory=TextConfig)
    """The encoder-decoder."""
    freeze_vision: bool = False
    """Keep the vision tower's weights fixed (PaLI's main pretraining phase)."""
    max_text_len: int = 64
    """Longest prompt in tokens the model accepts (serving and data truncate to it)."""
    max_target_len: int = 32
    """Longest target in tokens used in training."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (what `config.json` holds)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """`config.json` text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PaLIConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        d = dict(d)
        vision = _build(VisionConfig, d.pop("vision", {}), "vision")
        text = _build(TextConfig, d.pop("text", {}), "text")
        return _build(cls, {**d, "vision": vision, "text": text}, "model")

    def with_overrides(self, **kw: Any) -> PaLIConfig:
        """A copy with fields replaced; nested fields as `vision__image_size=448` or `text__vocab_size=...`."""
        top: dict[str, Any] = {}
        vision: dict[str, Any] = {}
        text: dict[str, Any] = {}
        for key, value in kw.items():
            if key.startswith("vision__"):
                vision[key[8:]] = value
            elif key.startswith("text__"):
                text[key[6:]] = value
            else:
                top[key] = value
        return dataclasses.replace(
            self,
            vision=_replace(self.vision, vision, "vision"),
            text=_replace(self.text, text, "text"),
            **top,
        )


def _build(cls, d: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {where} config keys {unknown}; expected some of {sorted(names)}")
    return cls(**d)


def _replace(obj, kw: dict[str, Any], where: str):
    if not kw:
        return obj
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(kw) - names)
    if unknown:
        raise ValueError(f"unknown {where} config keys {unknown}; expected some of {sorted(names)}")
    return dataclasses.replace(obj, **kw)


# --- named sizes -------------------------------------------------------------------------------------

# (width, depth, mlp_dim, heads); ViT-G/14 and ViT-e/14 as in the PaLI paper, So400m as in SigLIP.
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}

# (d_model, d_ff, heads, d_kv, encoder layers, decoder layers)
MT5_SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "small": (512, 1024, 6, 64, 8, 8),
    "base": (768, 2048, 12, 64, 12, 12),
    "large": (1024, 2816, 16, 64, 24, 24),
    "xl": (2048, 5120, 32, 64, 24, 24),
    "xxl": (4096, 10240, 64, 64, 24, 24),
}


def vit(variant: str, image_size: int = 224, **kw: Any) -> VisionConfig:
    """Vision config from a name such as "G/14" or "So400m/14"."""
    size, _, patch = variant.partition("/")
    if size not in VIT_SIZES or not patch.isdigit():
        raise ValueError(f"unknown ViT variant {variant!r}; expected one of {[k + '/14' for k in VIT_SIZES]}")
    width, depth, mlp, heads = VIT_SIZES[size]
    return VisionConfig(image_size=image_size, patch_size=int(patch), width=width, depth=depth, mlp_dim=mlp,
                        num_heads=heads, **kw)


def mt5(size: str, vocab_size: int = 250112) -> TextConfig:
    """mT5 config by size name ("small" ... "xxl")."""
    if size not in MT5_SIZES:
        raise ValueError(f"unknown mT5 size {size!r}; expected one of {sorted(MT5_SIZES)}")
    d_model, d_ff, heads, d_kv, enc, dec = MT5_SIZES[size]
    return TextConfig(vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, num_heads=heads, d_kv=d_kv,
                      num_layers=enc, num_decoder_layers=dec)


def _tiny() -> PaLIConfig:
    return PaLIConfig(
        name="tiny",
        vision=VisionConfig(image_size=48, patch_size=16, width=96, depth=2, mlp_dim=192, num_heads=4),
        text=TextConfig(vocab_size=2048, d_model=128, d_kv=32, d_ff=256, num_heads=4, num_layers=2,
                        num_decoder_layers=2, relative_attention_max_distance=64),
        max_text_len=48,
        max_target_len=24,
    )


def _small() -> PaLIConfig:
    return PaLIConfig(
        name="small",
        vision=VisionConfig(image_size=96, patch_size=12, width=256, depth=4, mlp_dim=1024, num_heads=4),
        text=TextConfig(vocab_size=8192, d_model=256, d_kv=32, d_ff=640, num_heads=8, num_layers=4,
                        num_decoder_layers=4),
    )


PRESETS: dict[str, Any] = {
    "tiny": _tiny,
    "small": _small,
    "base": lambda: PaLIConfig(name="base", vision=vit("B/16", 224), text=mt5("base")),
    "pali-3b": lambda: PaLIConfig(name="pali-3b", vision=vit("G/14", 224), text=mt5("large"), freeze_vision=True),
    "pali-15b": lambda: PaLIConfig(name="pali-15b", vision=vit("G/14", 224), text=mt5("xxl"), freeze_vision=True),
    "pali-17b": lambda: PaLIConfig(name="pali-17b", vision=vit("e/14", 224), text=mt5("xxl"), freeze_vision=True),
    # SigLIP 2 So400m/16 NaFlex (siglip2-so400m-patch16-naflex: a 16x16 position grid, up to 256 patches at the
    # image's own aspect ratio) with mT5-Large; import the tower with `jobs.import_hf --vision`.
    "pali-so400m-naflex": lambda: PaLIConfig(
        name="pali-so400m-naflex", text=mt5("large"), freeze_vision=True,
        vision=vit("So400m/16", 256, naflex=True, layout="siglip2", max_num_patches=256)),
}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--override KEY=VALUE` flags as a dict (values parsed as JSON, else kept as strings)."""
    out: dict[str, Any] = {}
    for kv in items:
        key, sep, val = kv.partition("=")
        if not sep:
            raise ValueError(f"--override {kv!r}; expected KEY=VALUE")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def get_preset(name: str) -> PaLIConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()
