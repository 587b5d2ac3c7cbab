"""Vision Transformer tower (original ViT, SigLIP and SigLIP 2 NaFlex layouts) in plain PyTorch.

Reference: Dosovitskiy et al. 2021 (ViT), Zhai et al. 2022 (scaling ViT: G/14), Zhai et al. 2023 (SigLIP),
Tschannen et al. 2025 (SigLIP 2, NaFlex). Patch convolution, learned position embeddings, pre-LN blocks,
final LayerNorm. No pooling: PaLI reads every output token. The optional class token exists only so
Hugging Face `ViTModel` checkpoints import exactly. In NaFlex mode (`cfg.naflex`) images keep their aspect
ratio: the square grid of position embeddings is resized to each image's patch grid and padded patches are
masked in attention (`pali.models.naflex`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pali.config import VisionConfig
from pali.models import naflex


class ViTAttention(nn.Module):
    """Multi-head self-attention with biases and 1/sqrt(d) scaling."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.width % cfg.num_heads:
            raise ValueError(f"vision width {cfg.width} is not divisible by num_heads {cfg.num_heads}")
        self.head_dim = cfg.width // cfg.num_heads
        self.q = nn.Linear(cfg.width, cfg.width)
        self.k = nn.Linear(cfg.width, cfg.width)
        self.v = nn.Linear(cfg.width, cfg.width)
        self.o = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x float[B, N, W]; mask bool[B, N] marks the keys that may be attended to (None: all)."""
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, -1, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
                   for t in (self.q(x), self.k(x), self.v(x)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class ViTMLP(nn.Module):
    """fc2(gelu(fc1 x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class ViTBlock(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = ViTAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = ViTMLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT encoder: pixels float[B, C, H, W] -> tokens float[B, N, width] (after the final norm).

    NaFlex towers also take packed patches float[B, 1 + max_num_patches, p*p*C] (`naflex.pack`: images of
    different sizes in one batch, padding masked) or, as `Siglip2VisionModel`, patches float[B, N, p*p*C]
    with `spatial_shapes` int[B, 2].
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_grid ** 2 + int(cfg.class_token), cfg.width))
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """Raise a ValueError naming the expected shape when the images do not fit this tower."""
        c, s = self.cfg.channels, self.cfg.image_size
        if self.cfg.naflex:
            return self._check_naflex(pixel_values)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (c, s, s):
            got = "x".join(str(d) for d in pixel_values.shape[1:]) if pixel_values.dim() == 4 \
                else f"a {pixel_values.dim()}-D tensor"
            raise ValueError(f"image is {got}; expected {c}x{s}x{s} (float[B, {c}, {s}, {s}]). "
                             f"Use model.set_image_size(n) to run at another resolution.")

    def _check_naflex(self, pixel_values: torch.Tensor) -> None:
        c, p, n = self.cfg.channels, self.cfg.patch_size, self.cfg.max_num_patches
        shape = tuple(pixel_values.shape)
        if pixel_values.dim() == 4:
            h, w = shape[2] // p, shape[3] // p
            if shape[1] != c or shape[2] % p or shape[3] % p or h * w > n:
                raise ValueError(f"image is {'x'.join(map(str, shape[1:]))}; expected {c}xHxW with H and W "
                                 f"multiples of the patch size {p} and (H/{p})*(W/{p}) <= max_num_patches {n}")
        elif pixel_values.dim() != 3 or shape[2] != c * p * p or shape[1] != 1 + n:
            raise ValueError(f"NaFlex pixel_values are {shape}; expected packed patches float[B, {1 + n}, "
                             f"{c * p * p}] (pali.models.naflex.pack) or an image float[B, {c}, H, W]")

    def token_mask(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """bool[B, N]: which output tokens are real patches (NaFlex packed input), None when all are."""
        if not self.cfg.naflex or pixel_values.dim() != 3:
            return None
        _, spatial = naflex.unpack(pixel_values)
        return naflex.patch_mask(spatial, pixel_values.shape[1] - 1)

    def embed_flat_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Flattened patches float[B, N, p*p*C] in (row, column, channel) order (SigLIP 2) -> float[B, N, W].

        The same weight as `embed_patches`, read in that order, so one checkpoint serves both inputs.
        """
        w = self.patch_embed.weight.permute(0, 2, 3, 1).reshape(self.patch_embed.out_channels, -1)
        return F.linear(patches.to(w.dtype), w, self.patch_embed.bias)

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The patch convolution as one matmul over non-overlapping patches: float[B, C, H, W] -> [B, N, W].

        Stride = kernel, so the conv is exactly a linear map of each flattened (C, p, p) patch; as a GEMM its
        backward is one matmul instead of a convolution backward (1-2 % of a CPU train step). The weight
        keeps the conv layout [W, C, p, p], so checkpoints are unchanged.
        """
        b, c, h, w = pixel_values.shape
        p = self.cfg.patch_size
        x = pixel_values.to(self.patch_embed.weight.dtype).reshape(b, c, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)  # patches row-major
        return F.linear(x, self.patch_embed.weight.reshape(self.patch_embed.out_channels, -1), self.patch_embed.bias)

    def forward(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values -> tokens float[B, N, width]; see the class docstring for the NaFlex inputs."""
        if self.cfg.naflex:
            return self._forward_naflex(pixel_values, spatial_shapes)
        self.check_pixels(pixel_values)
        x = self.embed_patches(pixel_values)  # (B, N, W)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def _forward_naflex(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor | None) -> torch.Tensor:
        g = self.cfg.pos_grid
        mask = None
        if spatial_shapes is not None:  # Siglip2VisionModel's inputs: patches float[B, N, p*p*C]
            patches = pixel_values
            mask = naflex.patch_mask(spatial_shapes, patches.shape[1])
            x = self.embed_flat_patches(patches)
        elif pixel_values.dim() == 4:  # one image size for the whole batch: no padding
            self.check_pixels(pixel_values)
            p = self.cfg.patch_size
            b = pixel_values.shape[0]
            spatial_shapes = torch.tensor([[pixel_values.shape[2] // p, pixel_values.shape[3] // p]] * b,
                                          device=pixel_values.device)
            x = self.embed_patches(pixel_values)
        else:
            self.check_pixels(pixel_values)
            patches, spatial_shapes = naflex.unpack(pixel_values)
            mask = naflex.patch_mask(spatial_shapes, patches.shape[1])
            x = self.embed_flat_patches(patches)
        x = x + naflex.resize_position_embeddings(self.pos_embed[0].reshape(g, g, -1), spatial_shapes, x.shape[1])
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: the unmasked attention kernel
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)

    @torch.no_grad()
    def set_image_size(self, image_size: int) -> None:
        """Resize the learned position embeddings (bicubic over the patch grid) for a new resolution.

        This is how a 224 px checkpoint continues at 448 or 588 px (PaLI's high-resolution phase).
        """
        if image_size % self.cfg.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {self.cfg.patch_size}")
        self.pos_embed = nn.Parameter(interpolate_pos_embed(self.pos_embed.data, self.cfg.class_token,
                                                            image_size // self.cfg.patch_size),
                                      requires_grad=self.pos_embed.requires_grad)
        self.cfg.image_size = image_size


def interpolate_pos_embed(pos: torch.Tensor, class_token: bool, new_grid: int) -> torch.Tensor:
    """Bicubic resize of position embeddings float[1, N(+1), W] to a new_grid x new_grid patch grid."""
    extra = pos[:, :1] if class_token else pos[:, :0]
    grid = pos[:, 1:] if class_token else pos
    old = int(math.isqrt(grid.shape[1]))
    if old * old != grid.shape[1]:
        raise ValueError(f"position embeddings hold {grid.shape[1]} patches; expected a square grid")
    if old == new_grid:
        return pos.clone()
    g = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos.dtype)
    return torch.cat([extra, g], dim=1)
